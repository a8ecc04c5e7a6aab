"""The `gptforge` command: each subcommand is a thin call into the library.

Flags are generated from the component dataclasses (config.py); a `--config` TOML file can set any
of them, and flags given on the command line win.
"""

from __future__ import annotations

import json
import sys
import typing
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from . import distributed
from .bench import bench_generate, bench_train
from .checkpoint import CONFIG, CheckpointError, check_writable, saved_run_config
from .config import SEED_MAX, ConfigError, build, check_range, check_toml, default_of, field_types, help_of, read_toml
from .data import Batches, DataConfig, DataError, TokenWindows, check_windows, data_defaults, eval_tokens
from .evaluate import EvalConfig, evaluate
from .generate import SampleConfig, sample_text
from .html_report import write_report
from .models import DEFAULT_ARCH, ModelSpec, get_spec
from .models.gpt2 import PRESETS, GPTConfig
from .prepare import PrepareConfig, train_tokenizer
from .prepare import prepare as run_prepare
from .serve import Limits
from .serve import serve as run_server
from .tokenizer import tokenizer_from_metadata
from .train import DEFAULT_CORPUS_RUN, RunConfig, TrainConfig, TrainingError, pick_device
from .train import train as run_training
from .weights import convert_target, init_model_config, load_any, to_gptforge, to_hf

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError)


def dataclass_options(*classes: type, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None):
    """Add a --flag for every field of the given dataclasses (or those named in `only`); unset flags arrive as None."""

    def decorate(fn):
        for cls in reversed(classes):
            types = field_types(cls)
            for f in reversed(fields(cls)):
                if f.name in exclude or (only is not None and f.name not in only):
                    continue
                flag = "--" + f.name.replace("_", "-")
                default = default_of(f)
                help_text = help_of(f) + (f"  [default: {default}]" if default is not None else "")
                if types[f.name] is bool:
                    option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
                elif typing.get_origin(types[f.name]) is list:  # repeatable; unset arrives as None
                    option = click.option(flag, f.name, multiple=True, help=help_text,
                                          type=click.Choice(f.metadata["choices"]) if "choices" in f.metadata else str,
                                          callback=lambda ctx, param, value: list(value) or None)
                elif "choices" in f.metadata:
                    option = click.option(flag, f.name, type=click.Choice(f.metadata["choices"]), default=None,
                                          help=help_text)
                else:
                    option = click.option(flag, f.name, type=types[f.name], default=None, help=help_text)
                fn = option(fn)
        return fn

    return decorate


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags the user actually passed."""
    return {k: v for k, v in values.items() if v is not None}


config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False),
    help="TOML file with settings (same names as the flags, with _ or -); flags given here win.",
)
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None,
    help="Device to run on; auto picks cuda, then mps, then cpu.  [default: auto]",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gptforge")
def cli() -> None:
    """Pretrain GPT-2-style language models from raw text.

    \b
    gptforge train my_texts/ --out runs/first      train a model (no DATA: a built-in corpus)
    gptforge eval runs/first held_out.txt          loss and perplexity on a text
    gptforge generate runs/first --prompt "Once"   sample from the model
    gptforge prepare corpus/ --out data/corpus     token shards for corpora bigger than memory
    gptforge bench train --preset gpt2-small       training tokens/s and MFU (also: bench generate)
    """


# ----------------------------------------------------------------------------- train

TRAIN_SECTIONS = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}
TRAIN_TOP_LEVEL = {"arch": str, "preset": str, "inputs": list, "init_from": str}


def arch_spec(values: dict, where: str | Path | None) -> ModelSpec:
    """The model family a run config names (no arch: GPT-2); an unknown one is an error naming the file."""
    try:
        return get_spec(values.get("arch", DEFAULT_ARCH))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def fixed_keys(spec: ModelSpec) -> set[str]:
    """Settings a resumed run keeps: its model family, the model's shape, the data and where the weights came from."""
    shape = {f.name for cls in (spec.config_class, DataConfig) for f in fields(cls)}
    return shape | {"arch", "preset", "inputs", "init_from"}


@cli.command()
@click.argument("data", nargs=-1, type=click.Path())
@config_option
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint (its config.toml is the base; "
                   "training flags such as a larger --max-steps may change).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Model shape to start from; shape flags override single values.  [default: mini]")
@click.option("--init-from", type=str, default=None,
              help="Start from these weights instead of random ones: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging "
                   "Face id or directory, OpenAI's TensorFlow checkpoint, the book's model.pth or a gptforge run. "
                   "The model keeps its shape; --context-length may crop it.")
@click.option("--nproc", type=int, default=None,
              help="Train with N processes on this machine: relaunches this command under torchrun "
                   "(DDP, or FSDP with --parallel fsdp). Multi-node: run torchrun yourself (see README).")
@dataclass_options(GPTConfig, DataConfig, TrainConfig)
def train(data: tuple[str, ...], config_file: str | None, resume: str | None, preset: str | None,
          init_from: str | None = None, nproc: int | None = None, **flags) -> None:
    """Train a GPT on DATA (text files or directories of .txt/.md files) and write a run directory.

    With no DATA, trains on English text that ships with Python (pydoc's help topics, ~465 KB).
    DATA may also be one directory made by `gptforge prepare`: its shards are memory-mapped, never
    loaded, and its tokenizer and split are used.
    """

    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if nproc and nproc > 1 and not distributed.is_distributed():
        sys.exit(distributed.launch(nproc, _without_nproc(_ARGV)))
    cfg, run_dir = resolve_train_config(data, config_file, resume, preset, given(flags), init_from)
    try:
        summary = run_training(cfg, run_dir, resume=resume is not None, log=click.echo)
    finally:
        distributed.cleanup()
    if not distributed.is_main():
        return
    parts = [f"{k} {summary[k]:.4f}" for k in ("train_loss", "val_loss") if k in summary]
    click.echo(f"{'stopped' if summary['stopped_by'] else 'done'}: step {summary['steps']}, " + ", ".join(parts)
               + f", {summary['tokens_per_s']:.0f} tokens/s -> {run_dir}")


def resolve_train_config(data, config_file, resume, preset, flags, init_from=None) -> tuple[RunConfig, Path]:
    """Layers, later winning: dataclass defaults, preset, saved run config (resume), --config file, flags.

    With --init-from, the model's shape is the source's instead (weights.init_model_config).
    """
    file_values = read_toml(config_file, TRAIN_SECTIONS, TRAIN_TOP_LEVEL) if config_file else {}
    if preset is not None:
        file_values["preset"] = preset
    if init_from is not None:
        file_values["init_from"] = init_from
    layers: list[dict] = []
    if resume:
        run_dir = Path(resume)
        saved = saved_train_config(run_dir)
        check_writable(run_dir, "--resume")
        changes = {**file_values, **flags}
        if data:
            changes["inputs"] = list(data)
        spec = arch_spec(saved, run_dir / CONFIG)
        for k in sorted(fixed_keys(spec) & set(changes)):
            if changes[k] != saved.get(k):
                raise ConfigError(f"cannot change {k} when resuming {run_dir} (the run has {saved.get(k)!r}, "
                                  f"asked for {changes[k]!r}); start a new run with --out instead")
        layers = [saved, changes]
        inputs = saved.get("inputs", [])
        preset_name = saved.get("preset")
        init_from = saved.get("init_from")
    else:
        spec = arch_spec(file_values, config_file)
        init_from = file_values.get("init_from")
        if init_from and "preset" in file_values:
            raise ConfigError("--preset and --init-from both set the model's shape; give only one")
        preset_name = None if init_from else file_values.get("preset", "mini")
        presets = spec.presets
        if preset_name is not None and preset_name not in presets:
            raise ConfigError(f"unknown preset {preset_name!r}; choose one of {', '.join(sorted(presets))}")
        inputs = list(data) or list(file_values.get("inputs", []))
        follow = data_defaults(inputs, {**presets.get(preset_name, {}), **file_values, **flags})  # tokenizer, vocab
        layers = [presets.get(preset_name, {}), {} if inputs else DEFAULT_CORPUS_RUN, follow, file_values, flags]
        if init_from:

            layers.append(init_model_config(init_from, {**file_values, **flags}).to_dict())
        run_dir = Path(flags.get("out") or file_values.get("out")
                       or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        if (run_dir / CONFIG).exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                              "or choose another --out")
        if run_dir.is_dir() and (held := sorted(p.name for p in run_dir.iterdir())):
            raise ConfigError(f"--out {run_dir}: the directory is not empty (it holds {', '.join(held[:3])}"
                              + (", ..." if len(held) > 3 else "") + "); a new run needs a new or empty directory")
        check_writable(run_dir, "--out")
    cfg = RunConfig(model=build(spec.config_class, *layers), data=build(DataConfig, *layers),
                    train=build(TrainConfig, *layers), inputs=[str(p) for p in inputs], preset=preset_name,
                    init_from=init_from)
    cfg.train.out = str(run_dir)
    return cfg, run_dir


def saved_train_config(run_dir: Path) -> dict:
    """A run's config.toml, checked against the copy its newest checkpoint carries (and restored from it).

    Settings that fix the model and data must agree (else one line names the key); a config.toml
    that cannot be read is replaced by the checkpoint's copy with a warning; changed training
    settings (a hand edit, or a resume killed before its first checkpoint) are named in a warning.
    """
    path = run_dir / CONFIG
    copy = saved_run_config(run_dir)
    if copy is None and not path.is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG}; is this a gptforge run directory?")
    try:
        saved = {"arch": DEFAULT_ARCH, **read_toml(path, TRAIN_SECTIONS, TRAIN_TOP_LEVEL)}  # no arch: GPT-2
    except ConfigError as e:
        if copy is None:
            raise
        click.echo(f"gptforge: warning: {e}; using the copy saved in checkpoint {copy[1]}", err=True)
        return {"arch": DEFAULT_ARCH, **check_toml(copy[0], f"{copy[1]}'s run config", TRAIN_SECTIONS, TRAIN_TOP_LEVEL)}
    if copy is None:  # no checkpoint yet, or one written before checkpoints carried the config
        return saved
    theirs = {"arch": DEFAULT_ARCH, **check_toml(copy[0], f"{copy[1]}'s run config", TRAIN_SECTIONS, TRAIN_TOP_LEVEL)}
    fixed = fixed_keys(arch_spec(saved, path))
    for key in sorted(fixed & (set(saved) | set(theirs))):
        if saved.get(key) != theirs.get(key):
            raise ConfigError(f"{path}: {key} is {saved.get(key)!r}, but checkpoint {copy[1]} was trained with "
                              f"{theirs.get(key)!r} (the file was edited or damaged); restore {key} = "
                              f"{theirs.get(key)!r} or delete {CONFIG} to use the checkpoint's copy")
    changed = [k for k in sorted(set(saved) | set(theirs)) if k not in fixed and k != "out"
               and saved.get(k) != theirs.get(k)]
    if changed:
        click.echo(f"gptforge: warning: {path} differs from the settings of checkpoint {copy[1]} in "
                   + ", ".join(f"{k} ({theirs.get(k)!r} -> {saved.get(k)!r})" for k in changed[:5])
                   + f"; using {CONFIG}'s", err=True)
    return saved


# ----------------------------------------------------------------------------- eval


@cli.command(name="eval")
@click.argument("source")
@click.argument("data", nargs=-1, required=True, type=click.Path())
@config_option
@dataclass_options(EvalConfig)
@device_option
@click.option("--json", "as_json", is_flag=True, default=None, help="Print a JSON line last.")
def eval_cmd(source: str, data: tuple[str, ...], config_file: str | None, **flags) -> None:
    """Loss and perplexity of the model in SOURCE on the text in DATA.

    SOURCE: a run dir or checkpoint, gpt2 / gpt2-medium / gpt2-large / gpt2-xl or another Hugging Face
    id or directory, OpenAI's TensorFlow checkpoint directory, or the book's model.pth.
    DATA may be a directory made by `gptforge prepare`: its val split is scored.
    """

    opts: dict[str, Any] = {f.name: default_of(f) for f in fields(EvalConfig)}
    opts.update({"device": "auto", "as_json": False})
    opts.update(_flat_config(config_file, opts, rename={"json": "as_json"}))
    opts.update(given(flags))
    e = build(EvalConfig, opts)
    device = pick_device(opts["device"])
    model, meta = load_any(source, device)
    check_vocab(source, model, meta)
    ctx = e.context_length or model.cfg.context_length
    if ctx > model.cfg.context_length:
        raise ConfigError(f"--context-length {ctx} must be between 1 and the model's {model.cfg.context_length}")
    tokenizer = tokenizer_from_metadata(meta)
    tokens = eval_tokens(data, tokenizer)
    windows = TokenWindows(tokens, ctx, e.stride)
    check_windows(windows, len(tokens), "evaluation", e.batch_size, drop_last=False)
    result = evaluate(model, Batches(windows, e.batch_size, shuffle=False, drop_last=False), e.max_batches, device)
    click.echo(f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | tokens {result.tokens:,}")
    if opts["as_json"]:
        click.echo(json.dumps({"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens}))


# ----------------------------------------------------------------------------- generate


@cli.command()
@click.argument("source")
@config_option
@click.option("--prompt", type=str, default=None, help="Text to continue.  [default: empty: a new document]")
@dataclass_options(SampleConfig)
@click.option("--seed", type=int, default=None, help="Seed for sampling: the same seed repeats the samples.")
@click.option("--num-samples", type=int, default=None, help="Continuations to generate.  [default: 1]")
@device_option
def generate(source: str, config_file: str | None, **flags) -> None:
    """Continue a prompt with the model in SOURCE (any format `eval` takes, e.g. gpt2-xl or a run dir)."""

    opts: dict[str, Any] = {"prompt": "", "seed": None, "num_samples": 1, "device": "auto"}
    opts.update({f.name: default_of(f) for f in fields(SampleConfig)})
    opts.update(_flat_config(config_file, opts))
    opts.update(given(flags))
    check_range("num_samples", opts["num_samples"], 1)
    check_range("seed", opts["seed"], 0, SEED_MAX)
    sample_cfg = build(SampleConfig, opts)
    device = pick_device(opts["device"])
    model, meta = load_any(source, device)
    check_vocab(source, model, meta)
    tokenizer = tokenizer_from_metadata(meta)
    stats: dict = {}
    texts = sample_text(model, tokenizer, opts["prompt"], sample_cfg, opts["num_samples"], opts["seed"], device,
                        stats=stats)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            click.echo(f"--- sample {i + 1} ---")
        click.echo(opts["prompt"] + text)
    seconds = stats["prefill_seconds"] + stats["decode_seconds"]
    click.echo(f"generated {stats['tokens']} tokens in {seconds:.2f} s ({stats['tokens'] / max(seconds, 1e-9):.1f} "
               f"tokens/s; prompt prefill {stats['prefill_seconds'] * 1000:.0f} ms)", err=True)


# ----------------------------------------------------------------------------- bench

BENCH_TRAIN_FLAGS = ("batch_size", "precision", "compile", "activation_checkpointing", "device", "seed")


@cli.group()
def bench() -> None:
    """Measure training and generation speed; the last line printed is JSON."""


def _bench_setup(preset: str | None, flags: dict) -> tuple[GPTConfig, Any]:

    preset = preset or "mini"
    model_cfg = build(GPTConfig, PRESETS[preset], flags)
    return model_cfg, pick_device(flags.get("device") or "auto")


@bench.command(name="train")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Model shape to start from; shape flags override single values.  [default: mini]")
@dataclass_options(GPTConfig, TrainConfig, only=tuple(f.name for f in fields(GPTConfig)) + BENCH_TRAIN_FLAGS)
@click.option("--steps", type=int, default=10, show_default=True, help="Timed optimizer steps (median reported).")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed steps first.")
@click.option("--profile", is_flag=True, help="Also profile one step and print torch.profiler's op table.")
def bench_train_cmd(preset: str | None, steps: int, warmup: int, profile: bool, **flags) -> None:
    """Training speed on random tokens: tokens/s, ms/step, MFU, peak memory.

    \b
    Last line: {"tokens_per_s", "ms_per_step", "mfu", "peak_mem_bytes", "device"}
    """

    check_range("steps", steps, 1)
    check_range("warmup", warmup, 0)
    flags = given(flags)
    t = build(TrainConfig, flags)
    model_cfg, device = _bench_setup(preset, flags)
    bench_train(model_cfg, t.batch_size, device, t.precision, t.compile, t.activation_checkpointing, steps,
                warmup, t.seed, profile, log=click.echo)


@bench.command(name="generate")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Model shape to start from; shape flags override single values.  [default: mini]")
@dataclass_options(GPTConfig, TrainConfig, only=tuple(f.name for f in fields(GPTConfig)) + ("batch_size", "device",
                                                                                              "seed"))
@click.option("--max-new-tokens", type=int, default=200, show_default=True, help="Tokens to generate per row.")
@click.option("--prompt-tokens", type=int, default=10, show_default=True, help="Length of the (random) prompt.")
def bench_generate_cmd(preset: str | None, max_new_tokens: int, prompt_tokens: int, **flags) -> None:
    """Generation speed, greedy, on a random prompt: prefill, and decode with and without the KV cache.

    \b
    Last line: {"prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_no_cache", "device"}
    """

    flags = given(flags)
    t = build(TrainConfig, {"batch_size": 1, "seed": 0}, flags)
    model_cfg, device = _bench_setup(preset, flags)
    if prompt_tokens < 1 or max_new_tokens < 2 or prompt_tokens + max_new_tokens > model_cfg.context_length:
        raise ConfigError(f"--prompt-tokens {prompt_tokens} (at least 1) plus --max-new-tokens {max_new_tokens} "
                          f"(at least 2) must fit in the context length {model_cfg.context_length}")
    bench_generate(model_cfg, t.batch_size, device, prompt_tokens, max_new_tokens, t.seed, log=click.echo)


# ----------------------------------------------------------------------------- convert


@cli.command()
@click.argument("source")
@click.option("--to", "target", type=click.Choice(["hf", "gptforge"]), required=True,
              help="hf: a directory transformers.GPT2LMHeadModel.from_pretrained loads; gptforge: a checkpoint "
                   "directory (or a .safetensors file) that eval, generate and --init-from take.")
@click.argument("out", type=click.Path())
@click.option("--n-heads", type=int, default=None,
              help="Attention heads of a book model.pth (not stored in it).  [default: emb_dim / 64, as in GPT-2]")
def convert(source: str, target: str, out: str, n_heads: int | None) -> None:
    """Convert the model in SOURCE (any format `eval` takes) to OUT.

    OUT is a new or empty directory (or, for --to gptforge, a new .safetensors file): nothing there
    is ever overwritten.
    """

    check_range("n_heads", n_heads, 1)
    convert_target(out, target)  # before the model is read
    model, meta = load_any(source, n_heads=n_heads)
    tokenizer = meta.get("tokenizer", "gpt2")
    if target == "hf":
        path = to_hf(model, out, tokenizer)
    else:  # the whole tokenizer travels with the checkpoint (a Hugging Face one in its metadata)
        path = to_gptforge(model, out, tokenizer_from_metadata(meta), source=source)
    head = "tied" if model.cfg.tie_weights else "untied"
    click.echo(f"{source} ({meta['format']}, {model.num_params():,} parameters, {head} head) -> {path}")


def check_vocab(source: str, model, meta: dict) -> None:
    """A model with fewer token ids than its tokenizer cannot read text (e.g. tiny test models)."""

    need = tokenizer_from_metadata(meta).vocab_size
    if model.cfg.vocab_size < need:
        raise ConfigError(f"{source}: the model has {model.cfg.vocab_size} token ids, fewer than the "
                          f"{meta.get('tokenizer', 'gpt2')} tokenizer's {need}; it cannot read or write text")


# ----------------------------------------------------------------------------- report


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="HTML file to write (a new file, or an earlier report to replace).  [default: report.html in the "
                   "run directory, or ./report.html for several]")
def report(run_dirs: tuple[str, ...], out: str | None) -> None:
    """Write one self-contained HTML report of the runs in RUN_DIRS (several runs are compared).

    Loss against steps and tokens, learning rate, throughput, the configs side by side with the
    differences highlighted, the sample of each evaluation and the final loss and perplexity.
    """

    target = Path(out) if out else (Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    path = write_report(list(run_dirs), target)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB, {len(run_dirs)} run{'s' * (len(run_dirs) > 1)})")


# ----------------------------------------------------------------------------- serve


@cli.command()
@click.argument("source")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default serves this machine only (loopback). Requests must name "
                   "a loopback host or this address in their Host header (0.0.0.0 or ::: any IP address too).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on; 0 picks a free one.")
@click.option("--allowed-host", multiple=True, metavar="NAME",
              help="Another name the Host header may give, e.g. the public name of a reverse proxy in front; "
                   "repeatable. Other names get 403, which stops DNS-rebinding pages.")
@click.option("--max-tokens-limit", type=int, default=256, show_default=True,
              help="Largest max_tokens a request may ask for; larger requests are rejected.")
@click.option("--max-prompt-chars", type=int, default=20_000, show_default=True,
              help="Longest prompt accepted, in characters (prompts are also limited to the model's context).")
@click.option("--max-concurrent", type=int, default=4, show_default=True,
              help="Generations run at once; more get 503 with Retry-After. Each holds a full-context KV cache "
                   "of 2 * n_layers * context_length * emb_dim * bytes per element (GPT-2 124M in fp32: 72 MiB); "
                   "the start-up line prints this model's.")
@device_option
def serve(source: str, host: str, port: int, allowed_host: tuple[str, ...], max_tokens_limit: int,
          max_prompt_chars: int, max_concurrent: int, device: str | None) -> None:
    """Serve the model in SOURCE: a web page to try prompts and an OpenAI-style /v1/completions API."""

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    for flag, value in (("--max-tokens-limit", max_tokens_limit), ("--max-prompt-chars", max_prompt_chars),
                        ("--max-concurrent", max_concurrent)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    limits = Limits(max_tokens_limit, max_prompt_chars, max_concurrent)
    run_server(source, host, port, device or "auto", limits, allowed_host, log=click.echo)
# ----------------------------------------------------------------------------- prepare, tokenizer


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory to write the shards to.")
@dataclass_options(PrepareConfig)
def prepare(inputs: tuple[str, ...], out: str, **flags) -> None:
    """Tokenize INPUT... (text, JSON Lines, Parquet; .gz/.zst; directories) into token shards in OUT.

    \b
    gptforge prepare corpus/ --out data/corpus --workers 0
    gptforge train data/corpus --out runs/corpus
    """

    run_prepare(inputs, out, build(PrepareConfig, given(flags)), log=click.echo)


@cli.group()
def tokenizer() -> None:
    """Train your own tokenizer."""


@tokenizer.command(name="train")
@click.argument("corpus", nargs=-1, required=True, type=click.Path())
@click.option("--vocab-size", required=True, type=int, help="Number of ids, <|endoftext|> and the 256 bytes included.")
@click.option("--out", required=True, type=click.Path(), help="Directory to write tokenizer.json to.")
@click.option("--text-field", default="text", show_default=True, help="Text field of JSON Lines / Parquet records.")
@click.option("--include", default=None, help="Comma-separated file name patterns searched for in directories.")
@click.option("--min-frequency", default=2, show_default=True, type=int, help="Merge only pairs seen this often.")
@click.option("--overwrite", is_flag=True, help="Replace the tokenizer.json that OUT holds.")
def tokenizer_train(corpus: tuple[str, ...], vocab_size: int, out: str, text_field: str, include: str | None,
                    min_frequency: int, overwrite: bool) -> None:
    """Train a byte-level BPE (GPT-2 style, with <|endoftext|>) on CORPUS... and save OUT/tokenizer.json.

    Use it with `gptforge prepare --tokenizer OUT` or `gptforge train --tokenizer OUT`.
    """

    path = train_tokenizer(corpus, out, vocab_size, text_field, include, min_frequency, overwrite)
    click.echo(f"wrote {path}")


def _flat_config(config_file: str | None, opts: dict[str, Any], rename: dict[str, str] | None = None) -> dict:
    """A --config TOML for eval/generate: flat keys named like the command's flags."""
    if not config_file:
        return {}
    rename = rename or {}
    types = {rename.get(k, k): (type(v) if v is not None else object) for k, v in opts.items()}
    inverse = {v: k for k, v in rename.items()}
    types = {inverse.get(k, k): t for k, t in types.items()}
    types.update({k: v for cls in (SampleConfig, EvalConfig) for k, v in field_types(cls).items() if k in opts})
    values = read_toml(config_file, {}, types)
    return {rename.get(k, k): v for k, v in values.items()}


_ARGV: list[str] = []


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become a one-line error and exit code 1, not a traceback."""
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=argv, prog_name="gptforge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except USER_ERRORS as e:
        click.echo(f"gptforge: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # a write that failed (full disk, read-only place): the path and the reason, no traceback
        path = f"{e.filename}: " if e.filename else ""
        click.echo(f"gptforge: error: {path}{e.strerror or e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)

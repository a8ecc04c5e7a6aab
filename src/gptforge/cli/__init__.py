"""The `gptforge` command: each subcommand parses, calls one library function and prints.

Flags are generated from the component dataclasses (the model families' settings, DataConfig, TrainConfig, EvalConfig,
SampleConfig, GenerateConfig, ServeConfig, BenchConfig, PrepareConfig); a `--config` TOML file can set
any of them for train, eval and generate, and flags given on the command line win.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from .. import distributed
from ..bench import BenchConfig, bench_generate, bench_train
from ..checkpoint import CHECKPOINTS, step_name
from ..config import ConfigError, build
from ..data import DataConfig
from ..data.prepare import PrepareConfig
from ..data.prepare import prepare as run_prepare
from ..errors import UserError
from ..evaluate import EvalConfig, evaluate_text
from ..evaluate.core import evaluate_core
from ..evaluate.tasks import TASKS, describe_task, evaluate_tasks, get_task
from ..generate import GenerateConfig, SampleConfig, generate_text
from ..models import ModelSettings, check_settings, get_spec, preset_arch
from ..quality import QualityConfig, bench_quality
from ..runs.report import write_report
from ..runs.rundir import RunLock
from ..serve import ServeConfig
from ..serve import serve as run_server
from ..tokenizer.train import TokenizerTrainConfig, train_tokenizer
from ..training import train as run_training
from ..training.config import TrainConfig, resolve_train_config
from ..training.plan import PlanConfig, plan_run, planned_settings
from ..training.recipes import RECIPES
from ..weights import convert as convert_model
from ..weights.export import ConvertConfig
from .options import (
    accepts_config,
    arch_option,
    checkpoint_option,
    config_option,
    dataclass_options,
    first_line,
    given,
    out_of_memory,
    pick,
    preset_option,
    without_nproc,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gptforge")
def cli() -> None:
    """Pretrain GPT-2 or Llama/Qwen3-style language models from raw text.

    \b
    gptforge train my_texts/ --out runs/first      train a model (no DATA: a built-in corpus)
    gptforge train my_texts/ --preset minimind-3   the same with minimind-3's Qwen3-style shape
    gptforge eval runs/first held_out.txt          loss, perplexity and bpb on a text
    gptforge generate runs/first --prompt "Once"   sample from the model
    gptforge prepare corpus/ --out data/corpus     token shards for corpora bigger than memory
    gptforge bench train --preset gpt2-small       training tokens/s and MFU (also: bench generate)
    gptforge plan my_texts/ --minutes 10           the model and settings for 10 minutes of training
    """


# ----------------------------------------------------------------------------- train

@cli.command()
@click.argument("data", nargs=-1, type=click.Path())
@config_option
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint (its config.toml is the base; "
                   "training flags such as a larger --max-steps may change). With --out NEW: a branch, NEW starts "
                   "from the run's newest checkpoint (or --checkpoint's) and the run itself is left as it is.")
@click.option("--checkpoint", "which", metavar="best|latest|STEP", default=None,
              help="With --resume RUN --out NEW: the checkpoint of RUN the branch starts from.  [default: latest]")
@arch_option
@preset_option
@click.option("--init-from", type=str, default=None,
              help="Start from these weights instead of random ones: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging "
                   "Face id or directory, OpenAI's TensorFlow checkpoint, the book's model.pth or a gptforge run. "
                   "The model keeps its shape; --context-length may crop it.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Start from a recipe's settings (book: the book's chapter 5; nanogpt: nanoGPT's train.py; modern: "
                   "llama + Muon + WSD + document masks); its preset unless --preset; flags and --config win.")
@click.option("--nproc", type=int, default=None,
              help="Train with N processes on this machine: relaunches this command under torchrun "
                   "(DDP, or FSDP with --parallel fsdp). Multi-node: run torchrun yourself (see docs/distributed.md).")
@dataclass_options(ModelSettings, DataConfig, TrainConfig)
def train(data: tuple[str, ...], config_file: str | None, resume: str | None, which: str | None, arch: str | None,
          preset: str | None, init_from: str | None = None, recipe: str | None = None, nproc: int | None = None,
          **flags) -> None:
    """Train a model (GPT-2, or Llama/Qwen3 with --arch llama) on DATA (text files or directories of .txt/.md
    files) and write a run directory.

    With no DATA, trains on English text that ships with Python (pydoc's help topics, ~465 KB).
    DATA may also be one directory made by `gptforge prepare`: its shards are memory-mapped, never
    loaded, and its tokenizer and split are used.
    """

    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if nproc and nproc > 1 and not distributed.is_distributed():
        sys.exit(distributed.launch(nproc, without_nproc(click.get_current_context().find_root().obj["argv"])))
    if flags.get("out") and distributed.restarted(flags["out"]):
        resume, which = flags["out"], None  # torchrun --max-restarts started this job again: continue the run it made
    branching = resume is not None and flags.get("out") is not None and \
        Path(flags["out"]).resolve() != Path(resume).resolve()
    if which is not None and not branching:
        raise ConfigError(f"--checkpoint {which} chooses where a branch starts (--resume RUN --out NEW); --resume "
                          "alone continues from the newest checkpoint: leave --checkpoint out")
    cfg, run_dir = resolve_train_config(data, config_file, resume, preset, given(flags), init_from,
                                        warn=lambda message: click.echo(message, err=True), arch=arch,
                                        recipe=recipe, planner=lambda inputs, values: planned_settings(
                                            inputs, values, log=click.echo))
    branch = Path(resume) if branching else None
    try:
        with RunLock(run_dir) if distributed.is_main() else nullcontext():  # one training process per run
            summary = run_training(cfg, run_dir, resume=resume is not None, log=click.echo,
                                   branch=(branch, which) if branch is not None else None)
    finally:
        distributed.cleanup()
    if not distributed.is_main():
        return
    parts = [f"{k} {summary[k]:.4f}" for k in ("train_loss", "val_loss", "val_bpb") if k in summary]
    best = summary.get("best")
    if best:
        where = run_dir / CHECKPOINTS / step_name(best["step"])
        parts.append(f"best val loss {best['val_loss']:.4f} at step {best['step']} ({where}: what eval, generate, "
                     "serve and convert use)")
    click.echo(f"{'stopped' if summary['stopped_by'] else 'done'}: step {summary['steps']}, " + ", ".join(parts)
               + f", {summary['tokens_per_s']:.0f} tokens/s -> {run_dir}")


# ----------------------------------------------------------------------------- eval


@cli.command(name="eval")
@click.argument("source")
@click.argument("data", nargs=-1, type=click.Path())
@click.option("--task", "tasks", multiple=True, metavar="NAME",
              help=f"Score a downstream task ({', '.join(TASKS)}) as lm-evaluation-harness does, on the FILE that "
                   "follows it (or NAME=FILE); repeatable. NAME alone: where its data is expected and how to get it.")
@click.option("--suite", type=click.Choice(["core"]), default=None,
              help="Score a suite: core, the DCLM CORE score (nanochat's), on the eval bundle directory given as DATA.")
@checkpoint_option
@dataclass_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, default=None, help="Print a JSON line last.")
def eval_cmd(source: str, data: tuple[str, ...], tasks: tuple[str, ...], suite: str | None, which: str | None,
             as_json: bool | None, **flags) -> None:
    """Loss, perplexity and bits per byte of the model in SOURCE on the text in DATA; or, with --task NAME FILE,
    downstream task scores (acc, acc_norm; LAMBADA's acc and perplexity) with a JSON line last.

    SOURCE: a run dir or checkpoint, gpt2 / gpt2-medium / gpt2-large / gpt2-xl or another Hugging Face
    id or directory, OpenAI's TensorFlow checkpoint directory, or the book's model.pth.
    DATA may be a directory made by `gptforge prepare`: its val split is scored.

    \b
    gptforge eval runs/first --task hellaswag hellaswag_val.jsonl --task lambada lambada_test.jsonl
    gptforge eval gpt2 --task arc-easy                  where ARC-Easy's file comes from
    gptforge eval runs/first --suite core eval_bundle   the CORE score, on the DCLM eval bundle
    """

    values = given(flags)
    if not tasks and {"num_fewshot", "fewshot_file"} & set(values):
        raise ConfigError("--num-fewshot and --fewshot-file are for --task (a --suite's tasks give their own shots)")
    if suite:
        if tasks or len(data) != 1:
            raise ConfigError("--suite core takes one DATA, the eval bundle directory (core.yaml, "
                              "eval_meta_data.csv, eval_data/), and no --task")
        click.echo(json.dumps(evaluate_core(pick(source, which), data[0], build(EvalConfig, values),
                                            log=click.echo)))
        return
    if tasks:
        pairs = task_files(tasks, data)
        if not pairs:
            for name in tasks:
                click.echo(describe_task(name))
            return
        scores = evaluate_tasks(pick(source, which), pairs, build(EvalConfig, values), log=click.echo)
        click.echo(json.dumps(scores))
        return
    if not data:
        raise ConfigError("give DATA (text files to score) or --task NAME FILE (a downstream task)")
    result = evaluate_text(pick(source, which), data, build(EvalConfig, values),
                           warn=lambda message: click.echo(message, err=True))
    bpb = "n/a" if result.bpb is None else f"{result.bpb:.4f}"
    click.echo(f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | bpb {bpb} | tokens {result.tokens:,}")
    if as_json:
        click.echo(json.dumps({"loss": result.loss, "perplexity": result.perplexity, "bpb": result.bpb,
                               "tokens": result.tokens}))


def task_files(tasks: tuple[str, ...], data: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, file) of each --task: NAME=FILE, or NAME with the files given after them in order; [] when no task
    has a file (the command then says where each one's data is expected)."""
    named = [t.partition("=")[::2] for t in tasks]
    for name, _ in named:
        get_task(name)
    bare = [name for name, path in named if not path]
    if not data and len(bare) == len(named):
        return []
    if len(data) != len(bare):
        raise ConfigError(f"--task needs one FILE after each NAME (or NAME=FILE): {len(bare)} task(s) without "
                          f"one, {len(data)} file(s) given; with --task, DATA are the tasks' files")
    files = iter(data)
    return [(name, path or next(files)) for name, path in named]


# ----------------------------------------------------------------------------- generate


@cli.command()
@click.argument("source")
@checkpoint_option
@dataclass_options(GenerateConfig, SampleConfig)
def generate(source: str, which: str | None, **flags) -> None:
    """Continue a prompt with the model in SOURCE (any format `eval` takes, e.g. gpt2-xl or a run dir)."""

    values = given(flags)
    cfg, sample = build(GenerateConfig, values), build(SampleConfig, values)
    source = pick(source, which)
    stats: dict = {}
    texts = generate_text(source, cfg, sample, stats=stats)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            click.echo(f"--- sample {i + 1} ---")
        click.echo(cfg.prompt + text)
    seconds = stats["prefill_seconds"] + stats["decode_seconds"]
    click.echo(f"generated {stats['tokens']} tokens in {seconds:.2f} s ({stats['tokens'] / max(seconds, 1e-9):.1f} "
               f"tokens/s; prompt prefill {stats['prefill_seconds'] * 1000:.0f} ms)", err=True)
    if stats["interrupted"]:
        click.echo("interrupted: the text above is what was generated before Ctrl-C", err=True)
        sys.exit(130)


# ----------------------------------------------------------------------------- bench

BENCH_GENERATE_DEFAULTS = {"batch_size": 1, "seed": 0}  # one prompt, greedy: what a user's generate does
BENCH_TRAIN_FLAGS = ("batch_size", "precision", "compile", "activation_checkpointing", "device", "seed", "attention")


@cli.group()
def bench() -> None:
    """Measure training and generation speed; the last line printed is JSON."""


def _bench_model(arch: str | None, preset: str | None, flags: dict):
    """The model config a benchmark measures: --arch or the preset's family, its preset, shape flags over it."""
    if preset is not None:
        if arch is not None and preset_arch(preset) != arch:
            raise ConfigError(f"preset {preset!r} is a {preset_arch(preset)} model, not --arch {arch}")
        arch = preset_arch(preset)
    spec = get_spec(arch or "gpt2")
    check_settings(spec, flags, "")
    return build(spec.config_class, spec.presets[preset or spec.default_preset], flags)


@bench.command(name="train")
@arch_option
@preset_option
@dataclass_options(ModelSettings)
@dataclass_options(TrainConfig, only=BENCH_TRAIN_FLAGS)
@dataclass_options(BenchConfig, only=("steps", "warmup", "profile", "document_mask"))
def bench_train_cmd(arch: str | None, preset: str | None, **flags) -> None:
    """Training speed on random tokens: tokens/s, ms/step, MFU, peak memory.

    \b
    Last line: {"tokens_per_s", "ms_per_step", "mfu", "peak_mem_bytes", "device"}
    """

    flags = given(flags)
    bench = build(BenchConfig, flags)
    bench_train(_bench_model(arch, preset, flags), build(TrainConfig, flags), bench, log=click.echo)


@bench.command(name="quality")
@click.argument("data", nargs=-1, type=click.Path())
@dataclass_options(QualityConfig)
def bench_quality_cmd(data: tuple[str, ...], **flags) -> None:
    """Held-out bits per byte after --minutes of training with --recipe (no DATA: the built-in corpus).

    Every recipe gets the same text, held-out part, transformer-block parameters and training time.

    \b
    Last line: {"recipe", "minutes", "steps", "tokens", "val_loss", "val_bpb", "device", "block_params",
                "params", "tokenizer", "curve", "best_val_bpb", "best_seconds", "best_step"}
    """

    bench_quality(data, build(QualityConfig, given(flags)), log=click.echo)


# ----------------------------------------------------------------------------- plan


@cli.command(name="plan")
@click.argument("data", nargs=-1, type=click.Path())
@dataclass_options(PlanConfig)
def plan_cmd(data: tuple[str, ...], **flags) -> None:
    """The model, batch, context, length and learning rates for --minutes of training on DATA on this device (no
    DATA: the built-in corpus), from a few timed steps of a ladder of shapes; then the train command.

    About 20 training tokens per parameter (Hoffmann et al. 2022) in the time, and at most 4 passes over the
    text (Muennighoff et al. 2023). `gptforge train DATA --minutes M` plans the same way.

    \b
    Last line: {"data_tokens", "params", "shape", "batch_size", "context_length", "steps", "tokens", "epochs",
                "lr", "minutes", "device"}
    """

    plan_run(data, build(PlanConfig, given(flags)), log=click.echo)


@bench.command(name="generate")
@arch_option
@preset_option
@dataclass_options(ModelSettings)
@dataclass_options(TrainConfig, only=("batch_size", "device", "seed"), defaults=BENCH_GENERATE_DEFAULTS)
@dataclass_options(BenchConfig, only=("max_new_tokens", "prompt_tokens"))
def bench_generate_cmd(arch: str | None, preset: str | None, **flags) -> None:
    """Generation speed, greedy, on a random prompt: prefill, and decode with and without the KV cache.

    \b
    Last line: {"prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_no_cache", "device"}
    """

    flags = given(flags)
    bench = build(BenchConfig, flags)
    t = build(TrainConfig, BENCH_GENERATE_DEFAULTS, flags)
    bench_generate(_bench_model(arch, preset, flags), t, bench, log=click.echo)


# ----------------------------------------------------------------------------- convert


@cli.command()
@click.argument("source")
@click.argument("out", type=click.Path(), required=False)
@click.option("--out", "out_flag", type=click.Path(), default=None, metavar="OUT",
              help="OUT as an option, as train, prepare and report take it (give OUT once, either way).")
@dataclass_options(ConvertConfig)
@checkpoint_option
def convert(source: str, out: str | None, out_flag: str | None, which: str | None, **values) -> None:
    """Convert the model in SOURCE (any format `eval` takes) to OUT.

    OUT is a new or empty directory (or, for --to gptforge, a new .safetensors file; for --to gguf, a
    new .gguf file): nothing there is ever overwritten.
    """

    if (out is None) == (out_flag is None):
        raise ConfigError("no OUT given: say where to write, `gptforge convert SOURCE OUT --to ...` (or --out OUT)"
                          if out is None else
                          f"OUT is given twice ({out} and --out {out_flag}); give it once")
    out = out or out_flag
    c = build(ConvertConfig, given(values))
    path, model, meta = convert_model(pick(source, which), c.to, out, c.n_heads, c.tokenizer, c.dtype)
    head = "tied" if model.cfg.tie_weights else "untied"
    click.echo(f"{source} ({meta['format']}, {model.num_params():,} parameters, {head} head) -> {path}")


# ----------------------------------------------------------------------------- report


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default=None,
              help="HTML file to write (a new file, or an earlier report to replace).  [default: report.html in the "
                   "run directory, or ./report.html for several]")
def report(run_dirs: tuple[str, ...], out: str | None) -> None:
    """Write one self-contained HTML report of the runs in RUN_DIRS (several runs are compared).

    Loss (and bits per byte) against steps and tokens, learning rate, throughput, the configs side by side
    with the differences highlighted, the sample of each evaluation and the final loss, perplexity and bpb.
    """

    target = Path(out) if out else (Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    path = write_report(list(run_dirs), target)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e3:.0f} KB, {len(run_dirs)} run{'s' * (len(run_dirs) > 1)})")


# ----------------------------------------------------------------------------- serve


@cli.command()
@click.argument("source")
@checkpoint_option
@dataclass_options(ServeConfig)
def serve(source: str, which: str | None, **flags) -> None:
    """Serve the model in SOURCE: a web page to try prompts and an OpenAI-style /v1/completions API."""

    settings = build(ServeConfig, given(flags))
    run_server(pick(source, which), settings, log=click.echo)


# ----------------------------------------------------------------------------- prepare, tokenizer


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Directory to write the shards to.")
@dataclass_options(PrepareConfig)
def prepare(inputs: tuple[str, ...], out: str, **flags) -> None:
    """Tokenize INPUT... (text, JSON Lines, Parquet; .gz/.zst; directories) into token shards in OUT, or one
    Hugging Face dataset: hf:NAME (a hub id, through the datasets cache) or a save_to_disk directory.

    \b
    gptforge prepare corpus/ --out data/corpus --workers 0
    gptforge prepare hf:HuggingFaceFW/fineweb-edu --config sample-10BT --streaming --out data/fineweb
    gptforge train data/corpus --out runs/corpus
    """

    run_prepare(inputs, out, build(PrepareConfig, given(flags)), log=click.echo)


@cli.group()
def tokenizer() -> None:
    """Train your own tokenizer."""


@tokenizer.command(name="train")
@click.argument("corpus", nargs=-1, required=True, type=click.Path())
@dataclass_options(TokenizerTrainConfig)
def tokenizer_train(corpus: tuple[str, ...], **values) -> None:
    """Train a byte-level BPE (GPT-2 style, with <|endoftext|>) on CORPUS... and save OUT/tokenizer.json.

    Use it with `gptforge prepare --tokenizer OUT` or `gptforge train --tokenizer OUT`.
    """

    t = build(TokenizerTrainConfig, given(values))
    path = train_tokenizer(corpus, t.out, t.vocab_size, t.text_field, t.include, t.min_frequency, t.overwrite)
    click.echo(f"wrote {path}")


for _command in (eval_cmd, generate, serve, plan_cmd, bench_train_cmd, bench_generate_cmd, bench_quality_cmd, convert,
                 report, prepare, tokenizer_train):  # train reads its own, with its tables and layering
    accepts_config(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become a one-line error and exit code 1, not a traceback."""
    try:  # the command line as given travels in click's context (train --nproc starts itself again with it)
        code = cli.main(args=argv, prog_name="gptforge", standalone_mode=False,
                        obj={"argv": list(sys.argv[1:] if argv is None else argv)})
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"gptforge: error: {e}", err=True)
        sys.exit(1)
    except (RuntimeError, MemoryError) as e:  # the allocator's own words: one line, what to reduce
        if not out_of_memory(e):
            raise
        click.echo(f"gptforge: error: out of memory ({first_line(e)}): reduce --batch-size, --context-length or "
                   "the model's size (--emb-dim, --n-layers)", err=True)
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

"""A run's settings and how they are layered: defaults < preset < saved run < --config file < flags.

TrainConfig (how a run trains, evaluates and saves) and RunConfig (everything saved as
RUN_DIR/config.toml) live here with `resolve_train_config`, which layers them for `gptforge train`
(a new run or --resume) and checks --resume and --out before anything is written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..checkpoint import CHECKPOINTS, CONFIG, check_writable, saved_run_config
from ..config import SEED_MAX, ConfigError, build, check_field, check_fields, check_toml, opt, read_toml, to_toml_dict
from ..data import DataConfig, data_defaults, prepared_dir
from ..devices import DEVICES, attention_opt
from ..evaluate.tasks import TASKS
from ..models import DEFAULT_ARCH, ModelSettings, ModelSpec, check_settings, get_spec, preset_arch, spec_for
from ..models.gpt2 import GPTConfig
from ..runs.choose import source_checkpoint
from ..runs.rundir import LOCK, in_use
from ..runs.trackers import LOGGERS
from ..weights import init_model_config, init_tokenizer
from .optim import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_ON
from .recipes import get_recipe

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INITS = ("gpt2", "torch")
CHECKPOINT_FORMATS = ("full", "sharded")

# `gptforge train` with no DATA (the built-in corpus, ~100K tokens of its 4,096-id tokenizer): these settings sit
# under the recipe, which is DEFAULT_CORPUS_RECIPE when nothing chose a model (1.4 minutes on a 2-core CPU).
# Flags and --config still win over both.
DEFAULT_CORPUS_RUN = {"epochs": 5, "lr": 1e-3, "tokenizer_vocab": 4096, "sample_prompt": "The",
                      "sample_temperature": 0.8, "sample_top_k": 40}
DEFAULT_CORPUS_RECIPE = "modern"


@dataclass
class TrainConfig:
    """How a run trains, evaluates and saves."""

    out: str | None = opt(None, "Run directory to write; default: runs/<date>-<time>.")
    batch_size: int = opt(8, "Windows per micro-batch.", low=1)
    grad_accum: int = opt(1, "Micro-batches whose gradients add up to one optimizer step.", low=1)
    lr: float = opt(4e-4, "Peak learning rate, reached at the end of warmup.", low=0, above=True)
    min_lr: float | None = opt(None, "Learning rate at the end of the cosine or wsd decay; default: lr / 10.", low=0)
    warmup_steps: int | None = opt(None, "Steps of linear warmup; default: 5% of the run's steps.", low=0)
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to weight matrices and embeddings only "
                                   "(see --weight-decay-on).", low=0)
    weight_decay_on: str = opt("matrices", "What --weight-decay decays: matrices (weight matrices and embeddings) or "
                                           "all (norms and biases too, as torch.optim.AdamW(model.parameters()) does).",
                               choices=WEIGHT_DECAY_ON)
    beta1: float = opt(0.9, "AdamW beta1.", low=0, high=1, below=True)
    beta2: float = opt(0.95, "AdamW beta2.", low=0, high=1, below=True)
    optimizer: str = opt("adamw", "adamw, or muon: torch.optim.Muon for the 2-D weight matrices inside the transformer "
                                  "blocks (attention, MLP) and AdamW (--lr, betas, --weight-decay) for embeddings, "
                                  "head, norms and biases.", choices=OPTIMIZERS)
    muon_lr: float = opt(0.02, "Muon's peak learning rate; the schedule scales it as it scales --lr.",
                               low=0, above=True)
    muon_momentum: float = opt(0.95, "Muon's momentum.", low=0, high=1, below=True)
    # 0.01 as Keller Jordan's reference Muon usage (lr 0.02); torch's default 0.1 goes with an lr near AdamW's
    # (adjust_lr_fn="match_rms_adamw"): at lr 0.02 it would shrink the matrices 50x faster than AdamW's 4e-4 x 0.1
    muon_weight_decay: float = opt(0.01, "Muon's decoupled weight decay: each step the matrices shrink by "
                                         "(current Muon lr) x this.", low=0)
    muon_nesterov: bool = opt(True, "Muon's Nesterov momentum.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value; 0 turns clipping off.", low=0)
    skip_nonfinite: bool = opt(False, "Skip a step whose loss or gradient is NaN/inf instead of stopping the run.")
    epochs: int = opt(1, "Passes over the training windows (when --max-steps is not given).", low=1)
    max_steps: int | None = opt(None, "Optimizer steps to train; overrides --epochs. Larger extends a run.", low=1)
    max_tokens: int | None = opt(None, "Training tokens to train on, turned into steps of the global batch "
                                       "(rounded up); instead of --max-steps or --epochs.", low=1)
    minutes: float | None = opt(None, "Train for this many minutes of optimizer steps on this device, instead of "
                                      "--max-steps, --max-tokens or --epochs: a few timed steps of the run's model "
                                      "before it starts set --max-steps (recorded in config.toml, so --resume keeps "
                                      "it). Without --preset, --init-from or shape flags, the model, batch, context "
                                      "and learning rate are `gptforge plan`'s choice for the time too.",
                                      low=0, above=True)
    schedule: str = opt("cosine", "Learning rate after warmup: cosine (decay to --min-lr), wsd (warmup-stable-decay: "
                                  "hold --lr, decay linearly over the last --decay-fraction of the steps) or constant.",
                        choices=SCHEDULES)
    decay_fraction: float = opt(0.2, "wsd: the fraction of the run's steps that decays to --min-lr.",
                                     low=0, high=1, above=True)
    eval_every: int = opt(50, "Evaluate train and val loss (and print a sample) every this many steps.", low=1)
    eval_batches: int = opt(10, "Batches of train and of val data each evaluation scores.", low=1)
    log_every: int = opt(10, "Write the training loss to metrics.jsonl every this many steps.", low=1)
    save_every: int | None = opt(None, "Save a checkpoint every this many steps; default: at each evaluation.", low=1)
    save_every_minutes: float | None = opt(None, "Also save a checkpoint when this many minutes passed since the last.",
                                                 low=0, above=True)
    keep_last: int = opt(3, "Checkpoints to keep (older ones are deleted; the best one, RUN_DIR/best.json, always "
                            "stays); 0 keeps all.", low=0)
    early_stop: int | None = opt(None, "End the run after this many evaluations without a new best val loss (it "
                                       "ends as a stopped run does: a checkpoint, the best kept); 0 or unset: never.",
                                       low=0)
    checkpoint_format: str | None = opt(
        None, "full: one model.safetensors and state.pt, gathered on rank 0; sharded: every rank writes its own "
              "part (torch.distributed.checkpoint), nothing gathered, readable on any number of processes. Default: "
              "sharded under torchrun with --parallel fsdp or with --async-checkpoint, else full.",
        choices=CHECKPOINT_FORMATS)
    async_checkpoint: bool = opt(False, "Write sharded checkpoints in the background while training goes on (the "
                                        "state is copied to CPU memory first); a checkpoint counts once sealed, at "
                                        "the next save or the end of the run.")
    eval_task: list[str] = field(default_factory=list, metadata={
        "help": "Also score a downstream task at each evaluation, NAME=FILE (repeatable; NAME one of "
                f"{', '.join(TASKS)}, FILE its data as `gptforge eval --task` reads it); logged as "
                "task/NAME/acc, task/NAME/acc_norm (or task/NAME/perplexity).", "metavar": "NAME=FILE"})
    eval_suite: str | None = opt(None, "Also score a suite at each evaluation: core=DIR, the DCLM CORE tasks of the "
                                       "eval bundle in DIR (as `gptforge eval --suite core DIR`); logged as core "
                                       "and task/core/LABEL (each task's centred accuracy).", metavar="core=DIR")
    eval_task_limit: int | None = opt(None, "Items of each --eval-task (and each --eval-suite task) scored at each "
                                            "evaluation (the first N); default: all.", low=1)
    sample_prompt: str = opt("Every effort moves you", "Prompt for the sample shown at each evaluation.")
    sample_tokens: int = opt(40, "Tokens in that sample; 0 turns samples off.", low=0)
    sample_temperature: float = opt(0.0, "Temperature of that sample; 0 is greedy.", low=0)
    sample_top_k: int | None = opt(None, "Top-k of that sample (with a temperature above 0).", low=1)
    init: str = opt("gpt2", "Initial weights of a new run: gpt2 (normal, std 0.02, projections into the residual "
                            "stream scaled by 1/sqrt(2 x layers): GPT-2, nanoGPT) or torch (PyTorch's module defaults, "
                            "as the book's GPTModel gets them).", choices=INITS)
    seed: int = opt(123, "Seed for weights, data order and dropout: a CPU run repeats exactly.", low=0, high=SEED_MAX)
    device: str = opt("auto", "auto picks cuda, then mps, then cpu.", choices=DEVICES)
    parallel: str = opt("ddp", "Under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard).",
                        choices=("ddp", "fsdp"))
    progress: bool = opt(True, "Show the progress bar.")
    logger: list[str] = field(default_factory=list, metadata={
        "help": "Also log to this experiment tracker (repeatable); metrics.jsonl is always written.",
        "choices": LOGGERS})
    precision: str = opt("auto", "auto: bf16 autocast on GPUs that have it, else fp16 with a GradScaler; fp32 on CPU.",
                         choices=PRECISIONS)
    attention: str = attention_opt()
    compile: bool = opt(False, "Compile the model with torch.compile (checkpoints stay plain model weights).")
    activation_checkpointing: bool = opt(False, "Recompute each block's activations in backward: less memory, "
                                                "about a third more compute.")

    def __post_init__(self) -> None:
        check_fields(self)  # each field's range and choices, from its metadata
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        for spec in self.eval_task:
            name, _, path = spec.partition("=")
            if name not in TASKS or not path:
                raise ConfigError(f"--eval-task {spec!r} must be NAME=FILE with NAME one of {', '.join(TASKS)}")
        if self.eval_suite is not None and not (self.eval_suite.startswith("core=") and self.eval_suite[5:]):
            raise ConfigError(f"--eval-suite {self.eval_suite!r} must be core=DIR (the DCLM eval bundle's directory)")
        if self.async_checkpoint and self.checkpoint_format == "full":
            raise ConfigError("--async-checkpoint writes sharded checkpoints; leave out --checkpoint-format full "
                              "(or give --checkpoint-format sharded)")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ConfigError(f"--max-steps {self.max_steps} and --max-tokens {self.max_tokens} both set the run's "
                              "length; give only one")
        if self.warmup_steps is not None and self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ConfigError(f"--warmup-steps {self.warmup_steps} must not exceed --max-steps {self.max_steps} "
                              "(the learning rate would never reach --lr)")


@dataclass
class RunConfig:
    """Everything a run needs: what is saved as RUN_DIR/config.toml."""

    model: Any = field(default_factory=GPTConfig)  # the config of the run's model family (models.SPECS)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inputs: list[str] = field(default_factory=list)  # text files / directories; empty: the default corpus
    preset: str | None = None
    init_from: str | None = None  # a model SOURCE whose weights the run starts from (weights.load_any)
    recipe: str | None = None  # the recipe (training/recipes.py) the run's settings started from

    def to_toml(self) -> dict:
        return to_toml_dict(arch=spec_for(self.model).arch, preset=self.preset, init_from=self.init_from,
                            recipe=self.recipe, inputs=self.inputs, model=self.model, data=self.data,
                            train=self.train)


def print_warning(message: str) -> None:
    print(message, file=sys.stderr)


TRAIN_SECTIONS = {"model": ModelSettings, "data": DataConfig, "train": TrainConfig}  # [model]: any family's keys
TRAIN_TOP_LEVEL = {"arch": str, "preset": str, "inputs": list, "init_from": str, "recipe": str}


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


def new_run_shape(file_values: dict, flags: dict, config_file) -> tuple[ModelSpec, str | None, Any]:
    """A new run's model family, preset and (with --init-from) the source's model config.

    The family is --arch, else the preset's, else the init source's, else GPT-2; the preset defaults
    to the family's (none with --init-from). Settings of another family are refused.
    """
    where = f"{config_file}: " if config_file else ""
    arch, preset, init_from = file_values.get("arch"), file_values.get("preset"), file_values.get("init_from")
    if init_from and preset is not None:
        raise ConfigError("--preset and --init-from both set the model's shape; give only one")
    init_cfg = init_model_config(init_from, {**file_values, **flags}) if init_from else None
    if preset is not None:
        family = preset_arch(preset)
        if arch is not None and arch != family:
            raise ConfigError(f"{where}preset {preset!r} is a {family} model, not {arch}; "
                              f"choose one of {', '.join(sorted(get_spec(arch).presets))} or --arch {family}")
        arch = family
    if init_cfg is not None:
        family = spec_for(init_cfg).arch
        if arch is not None and arch != family:
            raise ConfigError(f"--init-from {init_from} holds a {family} model, not --arch {arch}")
        arch = family
    spec = arch_spec({"arch": arch or DEFAULT_ARCH}, config_file)
    check_settings(spec, {**file_values, **flags}, where)
    return spec, None if init_cfg is not None else (preset or spec.default_preset), init_cfg


def recipe_layer(file_values: dict) -> dict:
    """The settings of the recipe file_values names ({} for none); its family and preset (unless a preset or
    --init-from is given) go into file_values, where new_run_shape finds them."""
    if not (name := file_values.get("recipe")):
        return {}
    recipe = get_recipe(name)
    if file_values.setdefault("arch", recipe["arch"]) != recipe["arch"]:
        raise ConfigError(f"recipe {name!r} trains a {recipe['arch']} model, not --arch {file_values['arch']}; "
                          f"leave out --arch, or choose a {file_values['arch']} recipe")
    if "init_from" not in file_values:
        file_values.setdefault("preset", recipe["preset"])
    return recipe


def resolve_train_config(data, config_file, resume, preset, flags, init_from=None, warn: Callable[[str], None] =
                         print_warning, arch: str | None = None, recipe: str | None = None,
                         planner: Callable[[list[str], dict], dict] | None = None) -> tuple[RunConfig, Path]:
    """Layers, later winning: dataclass defaults, preset, recipe, saved run config (resume), --config file, flags.

    With --init-from, the model's shape is the source's instead (weights.init_model_config). `data`,
    `config_file`, `resume`, `preset` and `init_from` are the command's arguments, `flags` the flags
    given; warnings about a resumed run's saved config go to `warn`. Returns the config and the run directory.
    With --minutes on a new run whose shape nothing names (`plans_shape`), `planner(inputs, settings so far)`
    returns a layer that sits just above the recipe (the CLI passes training.plan.planned_settings, which this
    module cannot import: it times the training step, which imports this module); None: the recipe's shape.
    """
    file_values = read_toml(config_file, TRAIN_SECTIONS, TRAIN_TOP_LEVEL) if config_file else {}
    if preset is not None:
        file_values["preset"] = preset
    if init_from is not None:
        file_values["init_from"] = init_from
    if arch is not None:
        file_values["arch"] = arch
    if recipe is not None:
        file_values["recipe"] = recipe
    layers: list[dict] = []
    plan_shape = plans_shape(file_values, flags, config_file, resume)
    if resume:
        run_dir = Path(resume)
        saved = saved_train_config(run_dir, warn)
        check_not_in_use(run_dir)
        if (out := flags.get("out")) is not None and Path(out).resolve() != run_dir.resolve():
            check_new_run_dir(Path(out))  # a branch: --out is a new run; --resume's directory is only read
            run_dir = Path(out)
        else:
            check_writable(run_dir, "--resume")
            if (run_dir / CHECKPOINTS).is_dir():  # a checkpoints/ that cannot be written fails now, not after training
                check_writable(run_dir / CHECKPOINTS, "--resume")
        changes = {**file_values, **flags}
        if data:
            changes["inputs"] = list(data)
        spec = arch_spec(saved, run_dir / CONFIG)
        for k in sorted(fixed_keys(spec) & set(changes)):
            if changes[k] != saved.get(k):
                raise ConfigError(f"cannot change {k} when resuming {run_dir} (the run has {saved.get(k)!r}, "
                                  f"asked for {changes[k]!r}); start a new run with --out instead")
        layers = [saved, changes]
        if changed := [k for k in sorted(changes) if k not in ("inputs", "out") and changes[k] != saved.get(k)]:
            warn("gptforge: note: resuming with " + ", ".join(f"{k} {saved.get(k)!r} -> {changes[k]!r}"
                                                          for k in changed) + f" (recorded in {run_dir / CONFIG})")
        inputs = saved.get("inputs", [])
        preset_name = saved.get("preset")
        init_from = saved.get("init_from")
        recipe = saved.get("recipe")
    else:
        if source := file_values.get("init_from"):  # a run directory: its best checkpoint, recorded as such
            file_values["init_from"] = source_checkpoint(
                source, None, note=lambda m: warn(f"gptforge: --init-from: {m}"),
                warn=lambda m: warn(f"gptforge: warning: {m}"))
        if not (data or file_values.get("inputs")) or plan_shape:
            if not {"recipe", "preset", "arch", "init_from"} & set(file_values):  # the default run, and plan's
                file_values["recipe"] = DEFAULT_CORPUS_RECIPE  # nothing chose a model
        recipe_settings = recipe_layer(file_values)
        recipe = file_values.get("recipe")
        spec, preset_name, init_cfg = new_run_shape(file_values, flags, config_file)
        init_from = file_values.get("init_from")
        presets = spec.presets
        inputs = list(data) or list(file_values.get("inputs", []))
        corpus_run = {} if inputs else DEFAULT_CORPUS_RUN
        if init_cfg is not None:  # the source brings its own tokenizer (init_tokenizer, below)
            corpus_run = {k: v for k, v in corpus_run.items() if k != "tokenizer_vocab"}
        user, below = {**file_values, **flags}, {**corpus_run, **recipe_settings}
        replaced = {}  # the user's choice replaces what a recipe (or the default run) chose beside it
        if "tokenizer" in user and "tokenizer_vocab" not in user:
            replaced["tokenizer_vocab"] = None  # their tokenizer, not a trained one
        if user.get("packing") == "pad" and "document_mask" not in user:
            replaced["document_mask"] = False  # one document per row: nothing to mask
        below.update(replaced)
        run_dir = Path(flags.get("out") or file_values.get("out")
                       or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        check_new_run_dir(run_dir)
        planned = planner(inputs, {"arch": spec.arch, **presets.get(preset_name, {}), **below, **user}) \
            if plan_shape and planner is not None else {}
        below.update(planned)
        # tokenizer; vocab_size (a preset's follows it too)
        follow = {**data_defaults(inputs, {**below, **user}), **replaced}
        if init_cfg is not None and user.get("tokenizer_vocab") is None:  # the source's tokenizer, or the same one
            if (chosen := init_tokenizer(init_from, user.get("tokenizer", follow.get("tokenizer")))) is not None:
                follow["tokenizer"] = chosen
        layers = [presets.get(preset_name, {}), corpus_run, recipe_settings, planned, follow, file_values, flags]
        if init_cfg is not None:
            layers.append(init_cfg.to_dict())
    check_applies(flags, layers, inputs)  # the command line's: a config.toml records every setting
    cfg = RunConfig(model=build(spec.config_class, *layers), data=build(DataConfig, *layers),
                    train=build(TrainConfig, *layers), inputs=[str(p) for p in inputs], preset=preset_name,
                    init_from=init_from, recipe=recipe)
    if cfg.data.tokenizer_vocab is not None and cfg.init_from is not None:
        raise ConfigError(f"--tokenizer-vocab trains a new tokenizer, but --init-from {cfg.init_from} brings its "
                          "model's own vocabulary: leave --tokenizer-vocab out (or give --tokenizer)")
    cfg.train.out = str(run_dir)
    return cfg, run_dir


def check_applies(user: dict, layers: list[dict], inputs: list) -> None:
    """Refuse a flag the run would ignore: --decay-fraction without the wsd schedule, --val-fraction on a prepared
    directory (its manifest fixes the split)."""
    merged = {k: v for layer in layers for k, v in layer.items()}
    schedule = merged.get("schedule", TrainConfig.schedule)
    if "decay_fraction" in user and schedule != "wsd":
        raise ConfigError(f"--decay-fraction {user['decay_fraction']} applies to --schedule wsd, and this run's "
                          f"schedule is {schedule}: add --schedule wsd or leave --decay-fraction out")
    for key in ("val_fraction", "val_split"):
        if key in user and (data_dir := prepared_dir(inputs)) is not None:
            raise ConfigError(f"--{key.replace('_', '-')} {user[key]}: {data_dir} is prepared data, whose split its "
                              f"manifest fixes; leave --{key.replace('_', '-')} out (or prepare it again with "
                              "`gptforge prepare --val-fraction`)")


def check_not_in_use(run_dir: Path) -> None:
    """Refuse a run directory that another training process holds (runs.rundir's lock). Rank 0 alone asks: under
    torchrun it takes the lock itself, maybe before the other ranks get here."""
    if dist.is_main() and (why := in_use(run_dir)):
        raise ConfigError(f"{why}; wait for it to end or stop it, or branch it with --resume {run_dir} --out NEW")


def check_new_run_dir(run_dir: Path) -> None:
    """A new run's --out (or a branch's): not a run, not in use, empty (but for a lock a killed run left), writable."""
    if dist.is_main() and (why := in_use(run_dir)):
        raise ConfigError(f"{why}; choose another --out")
    if (run_dir / CONFIG).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                          "or choose another --out")
    if run_dir.is_dir() and (held := sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)):
        raise ConfigError(f"--out {run_dir}: the directory is not empty (it holds {', '.join(held[:3])}"
                          + (", ..." if len(held) > 3 else "") + "); a new run needs a new or empty directory")
    check_writable(run_dir, "--out")


# The settings that give a run's length, and those that name a model's shape (with one, --minutes plans the length
# alone; without, `gptforge plan`'s choice of shape, batch, context and learning rate is the run's too).
LENGTH_KEYS = ("minutes", "max_steps", "max_tokens", "epochs")
SHAPE_KEYS = ("emb_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size")


def plans_shape(file_values: dict, flags: dict, config_file, resume) -> bool:
    """--minutes's checks: whether the plan chooses the model's shape too (a new run whose shape nothing names).

    --minutes on the command line replaces a --config file's length (its max_steps, max_tokens, epochs), and
    the flags' --max-steps, --max-tokens or --epochs replace its minutes; given together in one place they are
    an error (a file's epochs excepted: every config.toml records one). A resumed run keeps its planned steps.
    """
    minutes = next(f for f in fields(TrainConfig) if f.name == "minutes")
    check_field(minutes, flags.get("minutes", file_values.get("minutes")))  # before planning
    if resume:
        if "minutes" in flags:
            raise ConfigError(f"--minutes {flags['minutes']:g} plans a new run's length; a resumed run keeps the "
                              "max_steps its config.toml records: give --max-steps to change it")
        return False
    if "minutes" in flags:
        for k in LENGTH_KEYS[1:]:
            file_values.pop(k, None)
    elif set(LENGTH_KEYS[1:]) & set(flags):
        file_values.pop("minutes", None)
    if "minutes" in flags and (given := [k for k in LENGTH_KEYS[1:] if k in flags]):
        raise ConfigError(f"--minutes {flags['minutes']:g} and --{given[0].replace('_', '-')} {flags[given[0]]} both "
                          "set the run's length; give only one")
    if "minutes" in file_values and (given := [k for k in ("max_steps", "max_tokens") if k in file_values]):
        raise ConfigError(f"{config_file}: minutes and {given[0]} both set the run's length (a --minutes run's "
                          f"config.toml records both); remove one, or give --minutes or "
                          f"--{given[0].replace('_', '-')} on the command line")
    user = {**file_values, **flags}
    return "minutes" in user and not {"preset", "init_from"} & set(file_values) and not set(SHAPE_KEYS) & set(user)


def saved_train_config(run_dir: Path, warn: Callable[[str], None] = print_warning) -> dict:
    """A run's config.toml, checked against the copy its newest checkpoint carries (and restored from it).

    Settings that fix the model and data must agree (else one line names the key); a config.toml
    that cannot be read is replaced by the checkpoint's copy with a warning; changed training
    settings (a hand edit, or a resume killed before its first checkpoint) are named in a warning.
    """
    path = run_dir / CONFIG
    copy = saved_run_config(run_dir)
    if copy is None and not path.is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG}; is this a gptforge run directory?")
    theirs = None if copy is None else {  # no arch: GPT-2
        "arch": DEFAULT_ARCH, **check_toml(copy[0], f"{copy[1]}'s run config", TRAIN_SECTIONS, TRAIN_TOP_LEVEL)}
    try:
        saved = {"arch": DEFAULT_ARCH, **read_toml(path, TRAIN_SECTIONS, TRAIN_TOP_LEVEL)}
    except ConfigError as e:
        if theirs is None:
            raise
        warn(f"gptforge: warning: {e}; using the copy saved in checkpoint {copy[1]}")
        return theirs
    if theirs is None:  # no checkpoint yet, or one written before checkpoints carried the config
        return saved
    fixed = fixed_keys(arch_spec(saved, path))
    for key in sorted(fixed & (set(saved) | set(theirs))):
        if saved.get(key) != theirs.get(key):
            raise ConfigError(f"{path}: {key} is {saved.get(key)!r}, but checkpoint {copy[1]} was trained with "
                              f"{theirs.get(key)!r} (the file was edited or damaged); restore {key} = "
                              f"{theirs.get(key)!r} or delete {CONFIG} to use the checkpoint's copy")
    changed = [k for k in sorted(set(saved) | set(theirs)) if k not in fixed and k != "out"
               and saved.get(k) != theirs.get(k)]
    if changed:
        warn(f"gptforge: warning: {path} differs from the settings of checkpoint {copy[1]} in "
             + ", ".join(f"{k} ({theirs.get(k)!r} -> {saved.get(k)!r})" for k in changed[:5])
             + f"; using {CONFIG}'s")
    return saved

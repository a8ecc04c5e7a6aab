"""Planning a run for a time budget: `gptforge plan` and `gptforge train --minutes`.

`plan` reads the data as `train` would (its tokenizer, its train split), times a few optimizer steps of
shapes on a ladder (LADDER: depth and width growing together) on this device, smallest first, and
chooses for M minutes of training:

- while the time is the limit: the largest shape whose tokens in the time (D = tokens/s x 60 x M) reach
  the tokens per block parameter (N) a run of D tokens calls for (TOKENS_PER_PARAM: Hoffmann et al.
  2022's compute-optimal 20 at a billion tokens and more, far fewer in the minutes-on-a-CPU runs measured
  here, a line in log-log between), trained for the whole time;
- when that shape would pass over the training text more than EPOCHS times, the text is the limit
  (Muennighoff et al. 2023, Scaling Data-Constrained Language Models: a few passes are nearly as good as
  new text, many are not): the largest shape that can pass over it MIN_EPOCHS times in the time (bigger
  models learn more from the same text), for at most EPOCHS passes; a run that EPOCHS passes end is shorter
  than M minutes and says so.
- the batch: the recipe's 8, or the largest of BATCH_SIZES that leaves MIN_STEPS optimizer steps, so
  tokens per step grow with long runs; the context grows with the width (CONTEXTS) but stays
  within what the text fills.
- learning rates: the recipe's, AdamW's scaled down for models wider than the recipe's preset (scaled_lr).

`train --minutes` takes that choice when nothing names the model's shape (`planned_settings`, a layer of
training.config.resolve_train_config), and in any case times its own model before training (`plan_steps`),
so that --max-steps, and with it the schedule, fits the minutes.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .. import distributed as dist
from ..config import ConfigError, build, check_fields, opt
from ..data import (
    DataConfig,
    data_defaults,
    document_eot,
    find_text_files,
    prepared_dir,
    read_manifest,
    read_texts,
    split_tokens,
    tokenize_documents,
)
from ..devices import device_opt, pick_device
from ..models import get_spec
from ..perf import device_name, keep_freed_cpu_memory
from ..runs.metrics import human
from ..tokenizer import Tokenizer, get_tokenizer, train_bpe
from .config import DEFAULT_CORPUS_RUN, RunConfig, TrainConfig
from .ladder import Candidate, candidates
from .optim import check_optimizer
from .recipes import RECIPES, get_recipe
from .state import TrainData, training_text
from .step import RandomSteps, time_steps

# Tokens per block parameter that a run of so many tokens gives its model: (tokens, ratio) points, a straight line
# between them in log-log and flat outside. Hoffmann et al. 2022 (Chinchilla): about 20 at the scale they fitted
# (a billion tokens and more); measured here with benchmarks/plan_quality.py: the best shape of a minute on a CPU
# with plenty of text (~1M tokens) saw about 2.6, as small models far from convergence learn more per token when
# larger (2, a little under it, so that a noisy timing does not tip the choice to the next shape down). Kaplan et
# al. 2020 found the ratio growing with compute too.
TOKENS_PER_PARAM = ((1e6, 2.0), (1e9, 20.0))
# When the model the time calls for would pass over the text more than EPOCHS times, the text is the limit: the plan
# trains the largest model that can pass over it MIN_EPOCHS times in the time (at most MAX_PARAMS_PER_TEXT_TOKEN
# block parameters per token of text), for at most EPOCHS passes. Muennighoff et al. 2023: a few passes are nearly
# as good as new text; measured here (benchmarks/plan_quality.py): on a 93K-token text the best shape had 18 block
# parameters per token of it and was best after 2.4 passes with the decay at the end; larger ones did worse (to
# 68 per token), and every shape overfitted past ~4-5 passes.
# The shape chosen then is the largest that passes over the text at least MIN_EPOCHS times in the time (on the
# docstrings' 396K tokens at 3 minutes the best shape, 5x160, managed 2.8 passes; the shape that could pass 3 times
# did worse), trained for at most EPOCHS passes or the time, whichever ends first.
EPOCHS = 3
MIN_EPOCHS = 2.5
MAX_PARAMS_PER_TEXT_TOKEN = 20
# the recipe's batch of 8 windows (what the speeds are measured at) unless a run has tokens for MIN_STEPS steps of a
# larger one: small models learn more per token from small batches, long runs go faster with large ones
BATCH_SIZES = (8, 16, 32, 64)
MIN_STEPS = 1000  # the largest batch that still gives this many optimizer steps (else the smallest)
MEASURE_BATCH = 8  # windows per step when a shape's speed is measured
MEASURE_STEPS, MEASURE_WARMUP = 5, 1  # per shape; the median counts
CALIBRATION_STEPS, CALIBRATION_WARMUP = 5, 1  # train --minutes, on the run's own model
# recipes whose plan (and `bench quality`) trains a byte-level BPE of this many ids on the training text, as the
# default run does (the others count with GPT-2's tokenizer, as `train --recipe` does)
TOKENIZER_VOCAB = {"modern": DEFAULT_CORPUS_RUN["tokenizer_vocab"], "modern-moe": DEFAULT_CORPUS_RUN["tokenizer_vocab"]}


@dataclass
class PlanConfig:
    """What `gptforge plan` plans for: the time, the recipe, the tokenizer and split, the device."""

    minutes: float | None = opt(None, "Minutes of training to plan for (optimizer steps; start-up and evaluations "
                                      "not counted). Required.", low=0, above=True)
    recipe: str = opt("modern", "The recipe (training/recipes.py) whose model family, optimizer and learning rates "
                                "the plan uses: book, nanogpt, modern or modern-moe.", choices=tuple(RECIPES))
    tokenizer: str | None = opt(None, "Tokenizer to count with, as train's --tokenizer (gpt2 or a tokenizer.json); "
                                      "default: the recipe's (modern: a 4,096-id byte-level BPE trained on the "
                                      "training text; book, nanogpt: gpt2), or a prepared DATA_DIR's own.")
    tokenizer_vocab: int | None = opt(None, "Instead of --tokenizer: train a byte-level BPE of this many ids on the "
                                            "training text, as train's --tokenizer-vocab.", low=257)
    val_fraction: float = opt(0.1, "Share of the tokens held out for validation, as train's --val-fraction: the "
                                   "plan counts the rest.", low=0, high=1, below=True)
    device: str = device_opt()

    def __post_init__(self) -> None:
        if self.minutes is None:
            raise ConfigError("give --minutes M: the minutes of training to plan for")
        check_fields(self)
        if self.tokenizer is not None and self.tokenizer_vocab is not None:
            raise ConfigError(f"--tokenizer {self.tokenizer} and --tokenizer-vocab {self.tokenizer_vocab} both "
                              "choose the tokenizer; give only one")


# ----------------------------------------------------------------------------- the choice


def run_tokens(tokens_per_s: float, minutes: float, world: int = 1) -> int:
    """The training tokens `minutes` allow at that speed (per process, `world` processes)."""
    return int(tokens_per_s * world * 60 * minutes)


def tokens_per_param(tokens: float) -> float:
    """The tokens per block parameter a run of `tokens` tokens should give its model (TOKENS_PER_PARAM)."""
    (t0, r0), (t1, r1) = TOKENS_PER_PARAM
    x = min(max(math.log(tokens / t0) / math.log(t1 / t0), 0.0), 1.0) if tokens > 0 else 0.0
    return math.exp(math.log(r0) + x * (math.log(r1) - math.log(r0)))


def fits(params: int, tokens: int) -> bool:
    """Whether a model of `params` block parameters gets the tokens per parameter a run of `tokens` calls for."""
    return tokens >= tokens_per_param(tokens) * params


def fits_text(params: int, tokens: int, data_tokens: int) -> bool:
    """Whether a model of `params` block parameters passes MIN_EPOCHS times over the text in `tokens`, and is at
    most MAX_PARAMS_PER_TEXT_TOKEN per token of it."""
    return tokens >= MIN_EPOCHS * data_tokens and params <= MAX_PARAMS_PER_TEXT_TOKEN * data_tokens


def worth_measuring(params: int, tokens: int, data_tokens: int) -> bool:
    """Whether a candidate with `tokens` in the time could be chosen (a larger, slower one could not, if not)."""
    return fits(params, tokens) or fits_text(params, tokens, data_tokens)


@dataclass
class Row:
    """One measured candidate: its speed, the tokens the time gives it, whether that is enough for its size (`fits`),
    and whether it could pass MIN_EPOCHS times over the text (`fits_text`)."""

    candidate: Candidate
    tokens_per_s: float
    tokens: int
    fits: bool
    fits_text: bool


@dataclass
class Plan:
    """What `plan` chose: rows[chosen]'s shape, with its batch, context, steps, tokens, lr and estimated minutes."""

    data_tokens: int
    rows: list[Row]
    chosen: int
    batch_size: int
    steps: int
    tokens: int
    lr: float
    minutes: float  # estimated training minutes of the chosen plan
    capped: bool  # the text is the limit: the shape is the largest that passes over it MIN_EPOCHS times
    world: int = 1
    data_settings: dict = field(default_factory=dict)  # the tokenizer the plan chose (and a run must use)

    @property
    def candidate(self) -> Candidate:
        return self.rows[self.chosen].candidate

    @property
    def context_length(self) -> int:
        return self.candidate.context_length

    @property
    def epochs(self) -> float:
        return self.tokens / self.data_tokens

    def summary(self, device: str) -> dict:
        """The JSON line `gptforge plan` prints last."""
        return {"data_tokens": self.data_tokens, "params": self.candidate.params, "shape": dict(self.candidate.shape),
                "batch_size": self.batch_size, "context_length": self.context_length, "steps": self.steps,
                "tokens": self.tokens, "epochs": round(self.epochs, 3), "lr": self.lr,
                "minutes": round(self.minutes, 3), "device": device}

    def settings(self) -> dict:
        """The run settings the plan chose (train --minutes' layer): max_tokens caps the run at EPOCHS passes."""
        return {**self.candidate.shape, "context_length": self.context_length, "batch_size": self.batch_size,
                "lr": self.lr, "max_tokens": EPOCHS * self.data_tokens, **self.data_settings}


def scaled_lr(lr: float, width: int, base_width: int) -> float:
    """AdamW's learning rate for a model `width` wide, from one tuned at `base_width` (the recipe's preset): times
    sqrt(base_width / width) for wider models, as nanochat scales its embedding's and head's AdamW lr (by
    (d_model / 768) ** -0.5); narrower ones keep it (no extrapolation past what the recipe was tuned at).
    Muon's lr stays the recipe's: its orthogonalised updates have a size set by the lr, not by the width."""
    return float(f"{lr * min(1.0, math.sqrt(base_width / width)):.3g}")


def batch_size_for(tokens: int, context_length: int, data_tokens: int, world: int = 1) -> int:
    """The largest of BATCH_SIZES leaving MIN_STEPS steps of `tokens` (else the smallest), within one epoch's
    windows."""
    windows = max(1, (data_tokens - 1) // context_length // world)
    sizes = [b for b in BATCH_SIZES if b <= windows] or [BATCH_SIZES[0]]
    long_enough = [b for b in sizes if tokens // (b * context_length * world) >= MIN_STEPS]
    return max(long_enough) if long_enough else sizes[0]


def choose(data_tokens: int, minutes: float, speeds: Sequence[float], cands: Sequence[Candidate], lr: float,
           base_width: int, world: int = 1) -> Plan:
    """The plan, a pure function of the measured speeds (tokens/s per process of cands[i]; the first len(speeds)
    candidates were measured). The time is the limit while the largest candidate that gets its tokens per
    parameter (`fits`; none does: the smallest) passes over the text at most EPOCHS times: that one, for the
    whole time. Past that the text is the limit: the largest candidate that can pass over it MIN_EPOCHS times in
    the time (`fits_text`), for EPOCHS passes or the time. Then its batch, whole steps of it, and the lr for its
    width."""
    assert speeds, "at least the smallest candidate is measured"
    rows = []
    for c, s in zip(cands, speeds):
        tokens = run_tokens(s, minutes, world)
        rows.append(Row(c, s, tokens, fits(c.block_params, tokens), fits_text(c.block_params, tokens, data_tokens)))
    chosen = max((i for i, r in enumerate(rows) if r.fits), default=0)
    capped = rows[chosen].tokens > EPOCHS * data_tokens
    if capped:  # the text is the limit: usually a larger model; a smaller one past MAX_PARAMS_PER_TEXT_TOKEN
        chosen = max((i for i, r in enumerate(rows) if r.fits_text), default=chosen)
    row = rows[chosen]
    run = min(row.tokens, EPOCHS * data_tokens)
    context = row.candidate.context_length
    batch = batch_size_for(run, context, data_tokens, world)
    steps = max(1, run // (batch * context * world))
    tokens = steps * batch * context * world
    return Plan(data_tokens, rows, chosen, batch, steps, tokens,
                scaled_lr(lr, row.candidate.shape["emb_dim"], base_width),
                tokens / (row.tokens_per_s * world) / 60, capped, world)


# ----------------------------------------------------------------------------- measuring and planning


def measure_speeds(cands: Sequence[Candidate], t: TrainConfig, device: torch.device,
                   small_enough: Callable[[Candidate, float], bool], eot_id: int | None = None,
                   log=print) -> list[float]:
    """Training tokens/s of each candidate, smallest first, from MEASURE_STEPS timed steps (the median, after
    MEASURE_WARMUP) of `t`'s batch; stops after the first that is not `small_enough` at its speed (larger ones
    are slower still)."""
    speeds: list[float] = []
    for cand in cands:
        try:
            seconds = statistics.median(time_steps(RandomSteps.setup(cand.config, t, device, eot_id),
                                                   MEASURE_STEPS, MEASURE_WARMUP, device))
        except torch.cuda.OutOfMemoryError:
            log(f"plan: {cand.describe()} does not fit in the GPU's memory at batch {t.batch_size}")
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        speeds.append(t.batch_size * t.grad_accum * cand.context_length / seconds)
        if not small_enough(cand, speeds[-1]):
            break
    return speeds


def plan_tokenizer(inputs: list[str], values: dict) -> tuple[Tokenizer, DataConfig, dict]:
    """The tokenizer a run with these settings counts with, its DataConfig, and the data settings the plan chose
    ({"tokenizer_vocab": N} for a recipe in TOKENIZER_VOCAB on text whose tokenizer nothing named)."""
    chosen = {}
    if values.get("tokenizer_vocab") is None and "tokenizer" not in values and prepared_dir(inputs) is None \
            and (vocab := TOKENIZER_VOCAB.get(values.get("recipe"))):
        chosen["tokenizer_vocab"] = vocab
    settings = {**values, **chosen}
    follow = data_defaults(inputs, settings)  # its checks; a prepared directory's tokenizer
    data = build(DataConfig, follow, settings)
    if data.tokenizer_vocab is not None:
        return train_bpe(training_text(read_texts(inputs), data.val_fraction), data.tokenizer_vocab), data, chosen
    return get_tokenizer(data.tokenizer), data, chosen


def training_tokens(inputs: list[str], tokenizer: Tokenizer, val_fraction: float) -> int:
    """The tokens of the train split: a prepared directory's manifest count, or text tokenized and split as train
    does."""
    if (data_dir := prepared_dir(inputs)) is not None:
        return read_manifest(data_dir)["splits"]["train"]["tokens"]
    return len(split_tokens(tokenize_documents(read_texts(inputs), tokenizer), val_fraction)[0])


def make_plan(inputs: list[str], values: dict, minutes: float, device: torch.device, log=print) -> Plan:
    """The plan for a run of these settings (a flat dict of any section's: arch, recipe, preset, the tokenizer,
    val_fraction, optimizer and learning rates, precision, ...) on `inputs` for `minutes` on `device`."""
    if prepared_dir(inputs) is None:
        find_text_files(inputs)  # a missing file is an error now, before a tokenizer is trained or a step timed
    spec = get_spec(values["arch"])
    # compiling would take longer than the few steps it speeds up (a --compile run's own steps are timed compiled)
    t = build(TrainConfig, values, {"batch_size": MEASURE_BATCH, "grad_accum": 1, "compile": False})
    check_optimizer(t.optimizer)
    tokenizer, data, chosen = plan_tokenizer(inputs, values)
    data_tokens = training_tokens(inputs, tokenizer, data.val_fraction)
    vocab = values.get("vocab_size") or data.tokenizer_vocab or tokenizer.vocab_size
    preset = spec.presets.get(values.get("preset") or spec.default_preset, {})
    cands = candidates(spec.arch, {**preset, **values}, vocab, data_tokens)
    world = dist.world_size()
    eot_id = document_eot(tokenizer, "document_mask") if data.document_mask else None
    if device.type == "cpu":
        keep_freed_cpu_memory()  # as train() does: steps at their steady speed
    log(f"plan: {human(data_tokens)} training tokens ({tokenizer_name(data, tokenizer)}), {in_minutes(minutes)} on "
        f"{device_name(device)}" + (f" x {world} processes" if world > 1 else "") + "; timing shapes ...")
    speeds = measure_speeds(cands, t, device, lambda c, s: worth_measuring(
        c.block_params, run_tokens(s, minutes, world), data_tokens), eot_id, log)
    base_width = build(spec.config_class, preset).emb_dim
    plan = choose(data_tokens, minutes, speeds, cands, t.lr, base_width, world)
    return replace(plan, data_settings=chosen)


def in_minutes(minutes: float) -> str:
    return f"{minutes:g} minute{'' if minutes == 1 else 's'}"


def tokenizer_name(data: DataConfig, tokenizer: Tokenizer) -> str:
    if data.tokenizer_vocab is not None:
        return f"a {data.tokenizer_vocab:,}-id byte-level BPE trained on the training text"
    return f"tokenizer {tokenizer.name}"


# ----------------------------------------------------------------------------- what the plan prints


def plan_table(plan: Plan) -> list[str]:
    """The candidates measured, one line each, the chosen one marked."""
    lines = [f"  {'shape':<9} {'heads':>6} {'context':>7} {'params':>8} {'in blocks':>9} {'tokens/s':>10} "
             f"{'tokens':>8} {'per block param':>15} {'epochs':>7} {'minutes':>8}"]
    for i, r in enumerate(plan.rows):
        c = r.candidate
        heads = f"{c.shape['n_heads']}/{c.shape.get('n_kv_heads', c.shape['n_heads'])}"
        mark = "  <- chosen" if i == plan.chosen else row_note(plan, r)
        minutes = r.tokens / (r.tokens_per_s * plan.world) / 60
        lines.append(f"  {c.describe():<9} {heads:>6} {c.context_length:>7} {human(c.params):>8} "
                     f"{human(c.block_params):>9} {r.tokens_per_s:>10,.0f} {human(r.tokens):>8} "
                     f"{r.tokens / c.block_params:>15.2g} {r.tokens / plan.data_tokens:>7.2f} {minutes:>8.2f}{mark}")
    return lines


def row_note(plan: Plan, r: Row) -> str:
    """Why a candidate that was not chosen could not be ("" for smaller ones that could)."""
    if plan.capped:  # the text is the limit: the largest that passes over it MIN_EPOCHS times
        if r.candidate.block_params > MAX_PARAMS_PER_TEXT_TOKEN * plan.data_tokens:
            return f"  too big for the text (over {MAX_PARAMS_PER_TEXT_TOKEN} block parameters per token of it)"
        return "" if r.fits_text else f"  too slow for {MIN_EPOCHS:g} passes over the text"
    return "" if r.fits else f"  too big: a run this long wants {tokens_per_param(r.tokens):.2g} per block parameter"


def describe_plan(plan: Plan, minutes: float) -> str:
    c = plan.candidate
    text = (f"plan: {c.describe()} ({human(c.params)} parameters), batch {plan.batch_size} x {plan.context_length}, "
            f"{plan.steps:,} steps = {human(plan.tokens)} tokens ({plan.epochs:.2f} epochs, "
            f"{plan.tokens / c.block_params:.2g} per block parameter), lr {plan.lr:g}, about {plan.minutes:.2f} "
            "minutes")
    if plan.capped and plan.tokens < plan.rows[plan.chosen].tokens * 0.98:
        text += (f"; {EPOCHS} passes over the text end the run before {in_minutes(minutes)} do: the text is the "
                 "limit, more text would help")
    elif plan.capped:
        text += (f"; the text is the limit: a larger shape would pass over it fewer than {MIN_EPOCHS:g} times in "
                 f"{in_minutes(minutes)}, more text would help")
    elif not plan.rows[plan.chosen].fits:
        text += (f"; even the smallest shape gets fewer than the {tokens_per_param(plan.tokens):.2g} tokens per "
                 f"block parameter its run calls for in {in_minutes(minutes)}: more time would help")
    return text


def train_command(inputs: list[str], values: dict, plan: Plan) -> str:
    """The `gptforge train` command that trains the plan."""
    flags = {"recipe": values["recipe"], **plan.data_settings}
    for k in ("tokenizer", "tokenizer_vocab"):
        if values.get(k) is not None:
            flags[k] = values[k]
    if values.get("val_fraction", 0.1) != 0.1:
        flags["val_fraction"] = values["val_fraction"]
    if values.get("device", "auto") != "auto":
        flags["device"] = values["device"]
    flags.update(plan.candidate.shape, context_length=plan.context_length, batch_size=plan.batch_size,
                 max_steps=plan.steps, lr=plan.lr)
    if values.get("optimizer") == "muon":
        flags["muon_lr"] = values.get("muon_lr", TrainConfig.muon_lr)
    return shlex.join(["gptforge", "train", *inputs, *(s for k, v in flags.items()
                                                      for s in ("--" + k.replace("_", "-"), str(v)))])


def plan_values(inputs: list[str], cfg: PlanConfig) -> dict:
    """The settings `train --recipe R` would start from on these inputs (as resolve_train_config layers them:
    the default corpus's run below the recipe), with the plan's tokenizer and split flags."""
    recipe = get_recipe(cfg.recipe)
    values = {**({} if inputs else DEFAULT_CORPUS_RUN), **recipe, "recipe": cfg.recipe,
              "val_fraction": cfg.val_fraction, "device": cfg.device}
    if cfg.tokenizer is not None:
        values.update(tokenizer=cfg.tokenizer, tokenizer_vocab=None)
    if cfg.tokenizer_vocab is not None:
        values["tokenizer_vocab"] = cfg.tokenizer_vocab
    return values


def plan_run(data: Sequence[str], cfg: PlanConfig, log=print) -> dict:
    """`gptforge plan`: the candidates' table, the chosen plan, the train command and, last, the JSON line."""
    inputs = [str(p) for p in data]
    device = pick_device(cfg.device)
    values = plan_values(inputs, cfg)
    plan = make_plan(inputs, values, cfg.minutes, device, log)
    for line in plan_table(plan):
        log(line)
    log(describe_plan(plan, cfg.minutes))
    log("train it: " + train_command(inputs, values, plan))
    log(f"    (or: {shlex.join(['gptforge', 'train', *inputs, '--recipe', cfg.recipe])} --minutes {cfg.minutes:g}, "
        "which plans the same way and times its own steps)")
    result = plan.summary(device_name(device))
    log(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- train --minutes


def planned_settings(inputs: list[str], values: dict, log=print) -> dict:
    """The layer `train --minutes` takes from the plan when nothing names the model's shape (Plan.settings: shape,
    context, batch, AdamW lr, the EPOCHS cap as max_tokens, a trained tokenizer's vocabulary). `values` are
    the run's settings below the plan and above it (resolve_train_config's). Under torchrun rank 0 plans (the
    process group is joined here) and every rank gets the same layer."""
    device = dist.setup(pick_device(values.get("device", "auto")))

    def make() -> dict:
        plan = make_plan(inputs, values, values["minutes"], device, log)
        for line in plan_table(plan):
            log(line)
        log(describe_plan(plan, values["minutes"]))
        return plan.settings()

    return dist.from_main(make)


def seconds_per_step(cfg: RunConfig, eot_id: int | None, device: torch.device) -> float:
    """The median seconds of CALIBRATION_STEPS optimizer steps (after CALIBRATION_WARMUP) of a throwaway model of
    the run's config and settings, on random tokens; the random number generators are left as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        step = RandomSteps.setup(cfg.model, cfg.train, device, eot_id)
        seconds = statistics.median(time_steps(step, CALIBRATION_STEPS, CALIBRATION_WARMUP, device))
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def plan_steps(cfg: RunConfig, data: TrainData, device: torch.device, log=print) -> None:
    """--minutes: set cfg.train.max_steps to the optimizer steps that fit in that many minutes (rank 0 times them,
    every rank gets its number), at most the plan's max_tokens cap (set when the plan chose the shape: EPOCHS
    passes over the text), so the schedule is planned for exactly those steps. train() calls it for a new run."""
    t = cfg.train
    seconds = dist.from_main(lambda: seconds_per_step(cfg, data.eot_id, device))
    steps = max(1, int(t.minutes * 60 / seconds))
    note = ""
    if t.max_tokens is not None:
        cap = -(-t.max_tokens // (t.batch_size * t.grad_accum * cfg.model.context_length * dist.world_size()))
        if cap < steps:
            steps, note = cap, (f"; {EPOCHS} passes over the training text end it after {cap * seconds / 60:.2f} "
                                "minutes: the text is the limit, more text would help")
    t.max_steps, t.max_tokens = steps, None
    log(f"minutes: {seconds * 1000:.1f} ms per step (median of {CALIBRATION_STEPS}) -> {steps:,} steps in "
        f"{in_minutes(t.minutes)}{note}")


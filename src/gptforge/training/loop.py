"""The training loop, `train()`: one function, read top to bottom; and the evaluation and logging it runs."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..devices import pick_device
from ..evaluate import byte_table, evaluate, perplexity
from ..evaluate.core import PreparedCore, core_score, prepare_core, score_core_task
from ..evaluate.tasks import PreparedTask, format_scores, prepare_tasks, score_task
from ..generate import SampleConfig, sample_text
from ..models import spec_for
from ..perf import keep_freed_cpu_memory, mfu, peak_flops
from ..runs.metrics import MetricsLog, Progress, format_eval, human, plot_losses, plot_tasks
from ..runs.rundir import branch_point, branch_run
from ..runs.trackers import check_loggers, open_trackers
from ..tokenizer import Tokenizer
from .best import Verdict, diverging
from .config import RunConfig, TrainConfig
from .experts import CollapseWatch
from .optim import check_optimizer, describe_optimizer, set_lr
from .plan import plan_steps
from .state import (
    Checkpointer,
    RunState,
    Schedule,
    TrainData,
    build_data,
    build_model,
    check_resources,
    run_tokenizer,
    start_optimizer,
)
from .step import Precision, StepResult, stop_requests, train_step


def describe_model(model: torch.nn.Module) -> str:
    n = model.num_params()
    head = "tied head" if model.cfg.tie_weights else "untied head"
    arch = spec_for(model.cfg).arch
    positions = (f"; {model.num_params(non_embedding=True) / 1e6:.2f}M without position embeddings"
                 if spec_for(model.cfg).learned_positions else "")
    experts = ""
    if getattr(model.cfg, "n_experts", 0):  # a mixture of experts: what one token runs through
        experts = (f"; {model.num_params(active=True) / 1e6:.2f}M active, {model.cfg.experts_per_token} of "
                   f"{model.cfg.n_experts} experts per token")
    return f"model: {arch}, {n / 1e6:.2f}M parameters ({head}{positions}{experts}), {n * 4 / 1e6:.1f} MB in fp32"


@dataclass
class Evaluator:
    """Evaluation at a step: train/val loss and bits per byte, a sample, metrics.jsonl, trackers and loss.png.

    token_bytes is the tokenizer's byte table (`evaluate.byte_table`); None leaves train_bpb / val_bpb out.
    tasks (--eval-task) are scored too: task/NAME/METRIC in the record, and tasks.png beside loss.png; and the
    suite (--eval-suite core=DIR): `core` and each task's centred accuracy as task/core/LABEL.
    """

    cfg: RunConfig
    tokenizer: Tokenizer
    data: TrainData
    schedule: Schedule
    metrics: MetricsLog
    trackers: object
    progress: Progress
    run_dir: Path
    device: torch.device
    token_bytes: np.ndarray | None = None
    tasks: list[PreparedTask] = field(default_factory=list)
    suite: list[PreparedCore] = field(default_factory=list)
    routing: CollapseWatch = field(default_factory=CollapseWatch)  # a mixture of experts' collapsed router

    def __call__(self, model: torch.nn.Module, state: RunState) -> dict:
        t, step = self.cfg.train, state.step
        # each rank scores its share of every global batch, the sums added up: the same losses on every rank
        results = {name: evaluate(model, b, t.eval_batches, self.device, self.token_bytes, self.data.eot_id,
                                  ranks=(dist.rank(), dist.world_size()))
                   for name, b in self.data.eval_sets.items()}
        scores = {f"{name}_loss": r.loss for name, r in results.items()}
        scores.update({f"{name}_bpb": r.bpb for name, r in results.items() if r.bpb is not None})
        record = dict(event="eval", step=step, tokens=state.tokens, lr=self.schedule.lr_at(max(step - 1, 0)),
                      **scores)
        if "val_loss" in scores:
            record["val_perplexity"] = perplexity(scores["val_loss"])
        self.progress.write(format_eval(step, state.tokens, scores))
        if self.tasks:  # each rank scores its share of the items, all get every score; rank 0 writes
            ranks = (dist.rank(), dist.world_size())
            task_scores = {task.name: score_task(model, task, t.batch_size, self.device, ranks=ranks)[0]
                           for task in self.tasks}
            record.update({f"task/{name}/{k}": v for name, s in task_scores.items() for k, v in s.items()
                           if isinstance(v, float)})
            self.progress.write("  tasks: " + format_scores(task_scores))
        if self.suite:
            record.update(self.score_suite(model))
        if t.sample_tokens > 0:  # its own seeded generator: the training RNG stays untouched
            sample_cfg = SampleConfig(t.sample_tokens, t.sample_temperature, t.sample_top_k)
            text = sample_text(dist.unwrap(model), self.tokenizer, t.sample_prompt, sample_cfg, seed=t.seed + step,
                               device=self.device)[0]
            record["sample"] = t.sample_prompt + text
            self.progress.write(f"  sample: {record['sample']!r}")
        self.metrics.log(**record)
        if (collapsed := self.routing.observe(self.metrics.records)) is not None:
            self.progress.write(collapsed)
        if dist.is_main():
            self.trackers.log(self.metrics.records[-1])
            plot_losses(self.metrics.records, self.run_dir / "loss.png")
            if self.tasks or self.suite:
                plot_tasks(self.metrics.records, self.run_dir / "tasks.png")
        return record

    def score_suite(self, model: torch.nn.Module) -> dict:
        """{"core", "task/core/LABEL": centred accuracy} of the --eval-suite tasks, every rank scoring its share."""
        ranks = (dist.rank(), dist.world_size())
        scores = {p.task.label: score_core_task(model, p, self.cfg.train.batch_size, self.device, ranks=ranks)[0]
                  for p in self.suite}
        self.progress.write(f"  core {core_score(scores):.4f}: " + ", ".join(f"{label} {s['centered']:+.3f}"
                                                                           for label, s in scores.items()))
        return {"core": core_score(scores), **{f"task/core/{label}": s["centered"] for label, s in scores.items()}}


def log_step(result: StepResult, state: RunState, lr: float, tok_s: float, mfu: float | None, t: TrainConfig,
             metrics: MetricsLog, trackers, progress: Progress) -> None:
    if not result.finite:
        progress.write(f"step {state.step}: non-finite loss or gradient, update skipped")
        metrics.log(event="skipped", step=state.step, tokens=state.tokens, lr=lr)
    elif state.step % t.log_every == 0:
        metrics.log(event="train", step=state.step, tokens=state.tokens, lr=lr, train_loss=result.loss,
                    grad_norm=result.grad_norm, tokens_per_s=round(tok_s, 1),
                    mfu=round(mfu, 4) if mfu is not None else None, **result.experts)
        trackers.log(metrics.records[-1])


def epochs_done(state: RunState, data: TrainData) -> float:
    """Passes over this rank's training windows (or documents) so far."""
    return state.epoch + state.batch / max(len(data.batches), 1)


def tokens_per_step(cfg: RunConfig) -> int:
    """Training tokens in one optimizer step of the whole job (the global batch)."""
    t = cfg.train
    return t.batch_size * t.grad_accum * cfg.model.context_length * dist.world_size()


def describe_run(cfg: RunConfig, core: torch.nn.Module, data: TrainData, schedule: Schedule, optimizer, device,
                 amp: Precision, run_dir: Path, log) -> tuple[float, float | None]:
    """The start-up lines (model, data, optimizer, schedule, speed); returns (FLOPs per token, peak FLOP/s or None)."""
    t = cfg.train
    log(describe_model(core))
    log(data.summary)
    log(describe_optimizer(optimizer, t.lr))
    log(f"training: {schedule.total_steps} steps of {human(tokens_per_step(cfg))} tokens on {device}, lr {t.lr:g} "
        f"({schedule.describe()}) -> {run_dir}")
    fpt = spec_for(cfg.model).flops_per_token(cfg.model)
    peak, peak_source = peak_flops(device, amp.name)
    log(f"speed: precision {amp.name}, {fpt / 1e6:.1f} MFLOP per token; "
        + (f"MFU against {peak / 1e12:.3g} TFLOP/s ({peak_source})" if peak else peak_source))
    return fpt, peak


# ----------------------------------------------------------------------------- the loop


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, log=print,
          branch: tuple[Path, str | None] | None = None) -> dict:
    """Train (or resume) the run in run_dir; returns a summary of the last evaluation. `branch` (source run,
    --checkpoint or None for its newest): run_dir starts as a copy of the source's history up to that checkpoint."""
    t, run_dir = cfg.train, Path(run_dir)
    device = dist.setup(pick_device(t.device))
    if device.type == "cpu":
        keep_freed_cpu_memory()  # no page faults for the step's large tensors after the first steps
    main = dist.is_main()
    log = log if main else (lambda *args, **kwargs: None)  # only rank 0 prints, plots and writes
    warn = (lambda message: print(message, file=sys.stderr, flush=True)) if main else (lambda message: None)
    if branch is not None:  # --resume RUN --out NEW: rank 0 copies, then every rank resumes NEW
        if main:
            branch_run(branch[0], run_dir, branch_point(Path(branch[0]), branch[1], note=log, warn=warn), log)
        dist.barrier()
    check_resources(cfg.model, t, device, run_dir if main else None)  # memory, disk: before tokenizer, data, model
    tokenizer = run_tokenizer(cfg, run_dir, resume, warn)
    torch.manual_seed(t.seed)
    check_loggers(t.logger)
    check_optimizer(t.optimizer)
    tasks, suite = prepare_downstream(cfg, tokenizer)  # bad files: now
    data = build_data(cfg, tokenizer)
    if t.minutes is not None and not resume:  # --minutes: max_steps from the run's own timed steps
        plan_steps(cfg, data, device, log)
    schedule = Schedule.plan(t, len(data.batches), tokens_per_step(cfg))
    model = build_model(cfg, device, resume, log)  # the optimizer comes after wrapping: FSDP replaces parameters
    amp = Precision(t.precision, device)
    state, checkpointer = RunState(), Checkpointer(run_dir, cfg, tokenizer, data, schedule, amp.scaler, log, warn)
    restored = checkpointer.restore(model, state) if resume else None  # the optimizer's state (or the shards)
    resumed = restored is not None
    if main and not resumed:
        run_dir.mkdir(parents=True, exist_ok=True)
    model = dist.wrap(model, device, t.parallel, amp.name)
    core = dist.unwrap(model)  # the GPT itself: evaluation, sampling, saving (no _orig_mod. prefixes)
    step_model = torch.compile(model) if t.compile else model  # what the training step calls
    optimizer = start_optimizer(cfg, model, device, restored, warn)  # fresh, resumed, or --init-from's moments
    if main:
        if cfg.data.tokenizer_vocab is not None and not (run_dir / ckpt.RUN_TOKENIZER).is_file():
            ckpt.atomic_write_bytes(run_dir / ckpt.RUN_TOKENIZER, tokenizer.json.encode())
        ckpt.atomic_write_bytes(run_dir / ckpt.CONFIG, _toml_bytes(cfg))
        if not resumed:
            dist.mark_run(run_dir)  # torchrun --max-restarts: its restarts continue this run
    metrics = MetricsLog(run_dir / ckpt.METRICS if main else None, resume_step=state.step if resumed else -1,
                         warn=warn)
    trackers = open_trackers(t.logger, run_dir, cfg.to_toml(), resume_step=state.step if resumed else None)
    fpt, peak = describe_run(cfg, core, data, schedule, optimizer, device, amp, run_dir, log)
    progress = Progress(schedule.total_steps, state.step, enabled=t.progress and main, quiet=not main,
                        flops_per_token=fpt, peak_flops=peak)
    evaluator = Evaluator(cfg, tokenizer, data, schedule, metrics, trackers, progress, run_dir, device,
                          byte_table(tokenizer, warn), tasks, suite,
                          CollapseWatch(getattr(cfg.model, "experts_per_token", 1)))

    last_eval = evaluator(model, state) if state.step == 0 else {}
    save_every, best = t.save_every or t.eval_every, checkpointer.best
    model.train()
    step_seconds, start_tokens, stopping, last_save, early = [], state.tokens, False, time.monotonic(), None
    diverged = None  # the line said when the train loss went far above guessing (once)
    with stop_requests() as stop:
        while state.step < schedule.total_steps and not stopping:
            t0 = time.perf_counter()
            lr = schedule.lr_at(state.step)
            set_lr(optimizer, lr)
            save_due = main and t.save_every_minutes is not None and \
                time.monotonic() - last_save >= 60 * t.save_every_minutes
            result = train_step(model, step_model, optimizer, amp, t, data, state, device, stop, save_due)
            stopping = result.stop_requested
            state.step, state.tokens = state.step + 1, state.tokens + result.tokens  # scored: padding left out
            seconds = time.perf_counter() - t0
            step_seconds.append(seconds)
            tok_s = progress.step(result.loss, result.tokens, seconds, lr)
            log_step(result, state, lr, tok_s, mfu(fpt, tok_s, peak), t, metrics, trackers, progress)
            if not diverged and (diverged := diverging(result.loss, state.step, cfg.model.vocab_size, lr)):
                progress.write(diverged)
            verdict = Verdict()
            if state.step % t.eval_every == 0 or state.step == schedule.total_steps:
                last_eval = evaluator(model, state)
                verdict = best.observe(last_eval, epochs_done(state, data), t.early_stop)  # the same on every rank
                if verdict.message:
                    progress.write(verdict.message)
                early = verdict.stop
                stopping = stopping or early is not None
            if state.step % save_every == 0 or state.step == schedule.total_steps or stopping or result.save_due \
                    or verdict.new_best:  # the best's checkpoint is saved, whatever --save-every says
                checkpointer.save(model, optimizer, state)
                last_save = time.monotonic()
    checkpointer.finish()  # --async-checkpoint: the last write sealed before the run ends
    progress.close()
    trackers.close()
    stopped_by = early or ((stop[0] if stop else "a signal to another rank") if stopping and
                           state.step < schedule.total_steps else None)
    if early:
        log(f"stopped early at step {state.step} by {early}; checkpoint saved")
    elif stopped_by:
        log(f"stopped by {stopped_by} at step {state.step}; checkpoint saved, continue with --resume {run_dir}")
    train_seconds = sum(step_seconds)
    return dict(last_eval, steps=state.step, train_seconds=train_seconds, stopped_by=stopped_by,
                best=best.record() if best.step is not None else None,
                tokens_per_s=(state.tokens - start_tokens) / max(train_seconds, 1e-9),
                median_step_seconds=statistics.median(step_seconds) if step_seconds else None)


def prepare_downstream(cfg: RunConfig, tokenizer) -> tuple[list[PreparedTask], list[PreparedCore]]:
    """--eval-task's tasks and --eval-suite's CORE tasks, read and encoded once before the first step."""
    t = cfg.train
    tasks = prepare_tasks(t.eval_task, t.eval_task_limit, tokenizer, cfg.model.context_length)
    suite = [] if t.eval_suite is None else prepare_core(t.eval_suite[5:], t.eval_task_limit, tokenizer,
                                                         cfg.model.context_length)
    return tasks, suite


def _toml_bytes(cfg: RunConfig) -> bytes:
    import tomli_w

    return tomli_w.dumps(cfg.to_toml()).encode()

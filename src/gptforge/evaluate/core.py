"""The CORE suite (DCLM; nanochat's base-model score), read from a local copy of the DCLM eval bundle.

The bundle, as distributed (nanochat's eval_bundle.zip, unzipped):
    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter}]
    eval_meta_data.csv   one row per task: `Eval Task` (the label), `Random baseline` (percent), ...
    eval_data/           the dataset_uri files, JSON Lines in the three kinds of icl.py
Each task's items are shuffled with random.Random(1337) (then `--limit` keeps the first N, as nanochat's
max_per_task) and scored as icl.py says; its accuracy is centred on the random baseline b,
(acc - b/100) / (1 - b/100), and CORE is the mean of the centred accuracies.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..tokenizer import Tokenizer
from .icl import KINDS, IclTask, check_record
from .loglikelihood import score_rows
from .records import json_lines

GET = ("get it from https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip (nanochat's copy of the DCLM "
       "eval bundle) and unzip it")
SHUFFLE_SEED = 1337  # nanochat shuffles each task's items with random.Random(1337) before scoring them


@dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str  # one of icl.KINDS
    path: Path
    num_fewshot: int
    delimiter: str
    baseline: float  # the random baseline, percent


def _check_dir(directory: Path) -> None:
    what = "the DCLM eval bundle: core.yaml, eval_meta_data.csv and eval_data/"
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory; --suite core expects {what}; {GET}")
    for name in ("core.yaml", "eval_meta_data.csv"):
        if not (directory / name).is_file():
            raise DataError(f"{directory / name}: no such file; --suite core expects {what}; {GET}")


def read_baselines(path: Path) -> dict[str, float]:
    """eval_meta_data.csv's `Random baseline` (percent) of each `Eval Task`."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise DataError(f"{path}: needs the columns 'Eval Task' and 'Random baseline' (percent) and a row per task")
    out = {}
    for n, row in enumerate(rows, 2):
        try:
            value = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{n}: 'Random baseline' must be a number (percent), got "
                            f"{row['Random baseline']!r}") from None
        if not 0 <= value < 100:
            raise DataError(f"{path}:{n}: 'Random baseline' must be in [0, 100) percent, got {value}")
        out[row["Eval Task"]] = value
    return out


def _entry(entry, where: str, eval_data: Path, baselines: dict[str, float], csv_path: Path) -> CoreTask:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: must be a mapping with label, dataset_uri, num_fewshot, icl_task_type")
    for key in ("label", "dataset_uri", "icl_task_type"):
        if not isinstance(entry.get(key), str):
            raise DataError(f"{where}: needs {key!r}, a string")
    label, kind = entry["label"], entry["icl_task_type"]
    if kind not in KINDS:
        raise DataError(f"{where} ({label}): unknown icl_task_type {kind!r}; choose from {', '.join(KINDS)}")
    shots = entry.get("num_fewshot", [0])
    shots = shots[0] if isinstance(shots, list) and shots else shots  # a list; nanochat uses its first value
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise DataError(f"{where} ({label}): num_fewshot must be a list of counts like [0] or [10], got "
                        f"{entry.get('num_fewshot')!r}")
    delimiter = entry.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise DataError(f"{where} ({label}): continuation_delimiter must be a string, got {delimiter!r}")
    path = eval_data / entry["dataset_uri"]
    if not path.is_file():
        raise DataError(f"{path}: no such file (the dataset_uri of {label} in core.yaml)")
    if label not in baselines:
        raise DataError(f"{csv_path}: no row for {label!r} (its 'Random baseline' centres the accuracy)")
    return CoreTask(label, kind, path, shots, delimiter, baselines[label])


def read_bundle(directory: str | Path) -> list[CoreTask]:
    """The tasks of a DCLM eval bundle directory, checked: files present, kinds known, a baseline for each."""
    import yaml

    directory = Path(directory)
    _check_dir(directory)
    config = directory / "core.yaml"
    try:
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{config}: not YAML ({' '.join(str(e).split())})") from None
    tasks = doc.get("icl_tasks") if isinstance(doc, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise DataError(f"{config}: needs 'icl_tasks', a list of tasks (label, dataset_uri, num_fewshot, "
                        "icl_task_type, continuation_delimiter)")
    csv_path = directory / "eval_meta_data.csv"
    baselines = read_baselines(csv_path)
    out = [_entry(t, f"{config}: icl_tasks[{k}]", directory / "eval_data", baselines, csv_path)
           for k, t in enumerate(tasks)]
    labels = [t.label for t in out]
    if len(set(labels)) < len(labels):
        raise DataError(f"{config}: the label {next(x for x in labels if labels.count(x) > 1)!r} is given twice")
    return out


def read_items(task: CoreTask, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """The task's items, checked for its kind, in nanochat's order (shuffled with SHUFFLE_SEED), the first `limit`
    of them; and where each one is (file:line)."""
    pairs = [(check_record(task.kind, record, where), where) for record, where in json_lines(task.path)]
    if not pairs:
        raise DataError(f"{task.path}: no items (task {task.label})")
    random.Random(SHUFFLE_SEED).shuffle(pairs)
    pairs = pairs[:limit]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def centered(accuracy: float, baseline: float) -> float:
    """Accuracy centred on a random baseline given in percent: 0 at chance, 1 when all are right."""
    return (accuracy - baseline / 100) / (1 - baseline / 100)


@dataclass
class PreparedCore:
    task: CoreTask
    icl: IclTask

    @classmethod
    def build(cls, task: CoreTask, items: tuple[list[dict], list[str]], tokenizer: Tokenizer,
              max_length: int) -> PreparedCore:
        return cls(task, IclTask.build(task.kind, *items, task.delimiter, task.num_fewshot, tokenizer, max_length))


def score_core_task(model: torch.nn.Module, prepared: PreparedCore, batch_size: int, device,
                    progress: Callable[[int], None] | None = None,
                    ranks: tuple[int, int] = (0, 1)) -> tuple[dict, list[tuple[bool, list[float]]]]:
    """{"accuracy", "centered", "n"} of one task, and per item (right, each option's mean loss)."""
    icl = prepared.icl
    results = score_rows(model, icl.rows, [len(c) for c in icl.counts], batch_size, device, progress, ranks)
    judged = icl.judge(results)
    accuracy = sum(right for right, _ in judged) / len(judged)
    return {"accuracy": accuracy, "centered": centered(accuracy, prepared.task.baseline), "n": len(judged)}, judged


def core_score(scores: dict[str, dict]) -> float:
    """CORE: the mean of the tasks' centred accuracies."""
    return sum(s["centered"] for s in scores.values()) / len(scores)


def prepare_core(directory: str | Path, limit: int | None, tokenizer: Tokenizer, max_length: int) -> list[PreparedCore]:
    """Every task of the bundle read (the first `limit` items of each, in nanochat's order) and encoded."""
    tasks = read_bundle(directory)
    items = [read_items(t, limit) for t in tasks]
    return [PreparedCore.build(t, its, tokenizer, max_length) for t, its in zip(tasks, items)]


def format_core(label: str, s: dict, task: CoreTask) -> str:
    return (f"{label} accuracy {s['accuracy']:.4f} centered {s['centered']:+.4f} (n {s['n']}, {task.num_fewshot}-shot "
            f"{task.kind})")


def evaluate_core(source, directory: str | Path, cfg, log=print) -> dict:
    """`gptforge eval SOURCE --suite core DIR`: {"core", "tasks": {label: {"accuracy", "centered"}}} for the model
    in source, cfg (an EvalConfig) giving --limit (items per task), --batch-size, --context-length, --device and
    --tokenizer. The bundle is read and checked before the model is loaded."""
    from tqdm import tqdm

    from ..devices import pick_device
    from ..weights import load_for_text

    tasks = read_bundle(directory)
    items = [read_items(t, cfg.limit) for t in tasks]
    device = pick_device(cfg.device)
    model, tokenizer, _ = load_for_text(source, device, tokenizer=cfg.tokenizer)
    max_length = cfg.context_length or model.cfg.context_length
    if max_length > model.cfg.context_length:
        raise DataError(f"--context-length {max_length} must be between 1 and the model's "
                        f"{model.cfg.context_length}")
    scores = {}
    for task, its in zip(tasks, items):
        prepared = PreparedCore.build(task, its, tokenizer, max_length)
        with tqdm(total=len(prepared.icl.rows), desc=task.label, unit="row", leave=False) as bar:
            scores[task.label], _ = score_core_task(model, prepared, cfg.batch_size, device, bar.update)
        log(format_core(task.label, scores[task.label], task))
    core = core_score(scores)
    log(f"CORE {core:.4f} ({len(scores)} tasks)")
    return {"core": core, "tasks": {k: {"accuracy": s["accuracy"], "centered": s["centered"]}
                                    for k, s in scores.items()}}


"""Downstream tasks scored as lm-evaluation-harness 0.4 scores them (zero-shot, or few-shot: fewshot.py).

Each `Task` reads the records of its official file (JSON Lines, the user's own: nothing is
downloaded) into `Item`s: a context, the choices (or one cloze target) and the gold index, built
with the harness's prompt (records.py).
Multiple choice scores context + delimiter + choice for each choice: `acc` is the arg-max of the
summed log-likelihoods, `acc_norm` of those divided by the characters of each choice (the harness's
length normalisation). Cloze tasks (LAMBADA) score the target: `acc` when greedy decoding produces
it, `perplexity` = exp(-mean log-likelihood).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..errors import DataError
from ..tokenizer import Tokenizer
from .fewshot import with_fewshot
from .loglikelihood import Row, encode_pair, plan_rows, score_rows
from .records import (
    Item,
    arc_item,
    boolq_item,
    choice_item,
    commonsenseqa_item,
    copa_item,
    coqa_item,
    coqa_records,
    hellaswag_item,
    json_lines,
    lambada_item,
    openbookqa_item,
    piqa_item,
    siqa_item,
    squad_item,
    squad_records,
    winogrande_item,
    wsc273_item,
)
from .subjects import LAYOUTS, read_subjects


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable[[dict, str], Item] | None  # None: a directory of subjects (subjects.py)
    expects: str  # the file and its records
    get: str  # where the official file comes from
    train: str | None = None  # the train split few-shot examples come from; None: the evaluated file
    exclude: bool = False  # the harness leaves the evaluated item out of its examples (fewshot.py)
    labels: bool = False  # the labels may come from NAME-labels.lst beside NAME.jsonl, one per record
    records: Callable[[object, str], list[tuple[dict, str]]] | None = None  # a JSON document's records; else lines


TASKS = {t.name: t for t in (
    Task("hellaswag", hellaswag_item, "hellaswag_val.jsonl (10,042 records: ctx_a, ctx_b, activity_label, "
         "endings, label)", "get it from https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
         "hellaswag_train.jsonl (same place)", exclude=True),
    Task("lambada", lambada_item, "OpenAI's lambada_test.jsonl (5,153 records: text; its last word is predicted)",
         "get it from https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"),
    Task("arc-easy", arc_item, "AI2's ARC-Easy-Test.jsonl (2,376 records: question.stem, question.choices[]"
         ".{label,text}, answerKey)", "get it from ARC-V1-Feb2018.zip at https://allenai.org/data/arc "
         "(ARC-Easy/ARC-Easy-Test.jsonl)", "ARC-Easy-Train.jsonl (same zip)"),
    Task("arc-challenge", arc_item, "AI2's ARC-Challenge-Test.jsonl (1,172 records, as arc-easy's)",
         "get it from ARC-V1-Feb2018.zip at https://allenai.org/data/arc (ARC-Challenge/ARC-Challenge-Test.jsonl)",
         "ARC-Challenge-Train.jsonl (same zip)"),
    Task("piqa", piqa_item, "PIQA's valid.jsonl (1,838 records: goal, sol1, sol2) with valid-labels.lst beside it "
         "(one 0/1 per line), or records with a label field", "get valid.jsonl and valid-labels.lst from "
         "https://yonatanbisk.com/piqa/", "train.jsonl with train-labels.lst (same place)", exclude=True, labels=True),
    Task("winogrande", winogrande_item, "WinoGrande's dev.jsonl (1,267 records: sentence with a _, option1, option2, "
         "answer 1/2)", "get it from AI2's winogrande_1.1.zip (https://winogrande.allenai.org)",
         "train_xl.jsonl (same zip)", exclude=True),
    Task("wsc273", wsc273_item, "WSC273 as JSON Lines (273 records: text, pronoun, pronoun_loc, options, label)",
         "write it from Hugging Face's lighteval/winograd_wsc (config wsc273, split test) with "
         "datasets' to_json"),
    Task("copa", copa_item, "SuperGLUE's COPA val.jsonl (100 records: premise, choice1, choice2, question, label)",
         "get it from SuperGLUE's COPA.zip (https://super.gluebenchmark.com/tasks)", "train.jsonl (same zip)",
         exclude=True),
    Task("boolq", boolq_item, "SuperGLUE's BoolQ val.jsonl (3,270 records: passage, question, label)",
         "get it from SuperGLUE's BoolQ.zip (https://super.gluebenchmark.com/tasks)", "train.jsonl (same zip)",
         exclude=True),
    Task("openbookqa", openbookqa_item, "OpenBookQA's Data/Main/test.jsonl (500 records: question.stem, "
         "question.choices[].{label,text}, answerKey)", "get it from AI2's OpenBookQA-V1-Sep2018.zip "
         "(https://allenai.org/data/open-book-qa)", "Data/Main/train.jsonl (same zip)"),
    Task("commonsenseqa", commonsenseqa_item, "CommonsenseQA's dev_rand_split.jsonl (1,221 records: question.stem, "
         "question.choices[].{label,text} A-E, answerKey)", "get it from https://www.tau-nlp.org/commonsenseqa",
         "train_rand_split.jsonl (same place)", exclude=True),
    Task("siqa", siqa_item, "Social IQa's dev.jsonl (1,954 records: context, question, answerA-C) with "
         "dev-labels.lst beside it (one 1-3 per line), or records with a label field", "get it from AI2's "
         "socialiqa-train-dev.zip (https://allenai.org/data/socialiqa)", "train.jsonl with train-labels.lst "
         "(same zip)", exclude=True, labels=True),
    Task("squad", squad_item, "SQuAD's dev-v2.0.json (11,873 questions: data[].paragraphs[].{context, qas[].{"
         "question, answers[].text}}; dev-v1.1.json works too)", "get it from https://rajpurkar.github.io/SQuAD-explorer/",
         records=squad_records, exclude=True),
    Task("coqa", coqa_item, "CoQA's coqa-dev-v1.0.json (500 stories: data[].{story, questions[].input_text, "
         "answers[].input_text}; the last turn of each is predicted)", "get it from https://stanfordnlp.github.io/coqa/",
         records=coqa_records, exclude=True),
    Task("ceval", None, "C-Eval's directory (ceval-exam.zip unzipped: val/SUBJECT_val.csv and dev/SUBJECT_dev.csv, "
         "52 subjects, 1,346 val questions: id, question, A, B, C, D, answer)", "get ceval-exam.zip from "
         "https://huggingface.co/datasets/ceval/ceval-exam and unzip it"),
    Task("cmmlu", None, "CMMLU's directory (cmmlu_v1_0_1.zip unzipped: test/SUBJECT.csv and dev/SUBJECT.csv, "
         "67 subjects, 11,582 test questions: Question, A, B, C, D, Answer)", "get cmmlu_v1_0_1.zip from "
         "https://huggingface.co/datasets/haonan-li/cmmlu and unzip it"),
    Task("choice", choice_item, "your JSON Lines: {\"context\", \"choices\": [...], \"label\": i} (multiple "
         "choice), {\"context\", \"continuation\"} (cloze) or {\"contexts\": [...], \"continuation\", \"label\": i} "
         "(schema); optional \"delimiter\" (default \" \")",
         "write it yourself (docs/eval.md: 'Downstream tasks')", exclude=True),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def describe_task(name: str) -> str:
    """Where a task's data is expected and how to get it (`gptforge eval SOURCE --task NAME` alone)."""
    task = get_task(name)
    what = "DIR" if name in LAYOUTS else "FILE"
    return f"{task.name}: expects {task.expects}\n  {task.get}\n  then: --task {task.name} {what}"


def _labels_file(path: Path) -> list[str] | None:
    labels = path.with_name(path.stem + "-labels.lst")
    return labels.read_text().split() if labels.is_file() else None


def read_task(name: str, path: str | Path, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all when None) of task `name`'s file; a missing or malformed file is a DataError
    naming the file, line and field."""
    task, path = get_task(name), Path(path)
    if name in LAYOUTS:
        if not path.is_dir():
            raise DataError(f"{path}: no such directory; task {name} expects {task.expects}; {task.get}")
        return read_subjects(name, path, limit)
    if not path.is_file():
        raise DataError(f"{path}: no such file; task {name} expects {task.expects}; {task.get}")
    if task.records is not None:  # one JSON document (SQuAD, CoQA), its records flattened
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"{path}: not JSON ({e}); {name} expects {task.expects}") from None
        items = [task.read(record, where) for record, where in task.records(doc, str(path))[:limit]]
    else:
        items = _read_lines(task, path, limit)
    if not items:
        raise DataError(f"{path}: no records; task {name} expects {task.expects}")
    kinds = list(dict.fromkeys(it.kind for it in items))
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes {' and '.join(kinds)} records; put each kind in its own file")
    return items


def _read_lines(task: Task, path: Path, limit: int | None) -> list[Item]:
    """The items of a JSON Lines file (with a -labels.lst beside it for tasks that have one)."""
    name = task.name
    labels = _labels_file(path) if task.labels else None
    items = []
    for record, where in itertools.islice(json_lines(path, f"{name} expects {task.expects}"), limit):
        if labels is not None:
            if len(items) >= len(labels):
                raise DataError(f"{path.with_name(path.stem + '-labels.lst')}: fewer labels than records "
                                f"({len(labels)}) in {path}")
            record = {**record, "label": labels[len(items)]}
        items.append(task.read(record, where))
    return items


def task_items(name: str, path: str | Path, limit: int | None = None, num_fewshot: int = 0,
               fewshot_files: dict[str, str] | None = None) -> list[Item]:
    """read_task's items, with num_fewshot examples before each context drawn as the harness draws them: from the
    task's train file (fewshot_files[name]) or, for a task without one, the whole evaluated file."""
    if num_fewshot and name in LAYOUTS:  # the first examples of each subject's dev file
        read_task(name, path)  # the directory checked as without examples
        return read_subjects(name, path, limit, num_fewshot)
    items = read_task(name, path, limit)
    if not num_fewshot:
        return items
    task, fewshot_files = TASKS[name], fewshot_files or {}
    if task.train is None:
        pool, where = (items if limit is None else read_task(name, path)), str(path)
    elif name not in fewshot_files:
        raise ConfigError(f"--num-fewshot {num_fewshot}: {name}'s examples come from its train split, as "
                          f"lm-evaluation-harness draws them; give --fewshot-file {name}=FILE ({task.train})")
    else:
        pool, where = read_task(name, fewshot_files[name]), fewshot_files[name]
    return with_fewshot(items, pool, num_fewshot, name, task.exclude, where)


# ----------------------------------------------------------------------------- scoring


@dataclass
class PreparedTask:
    """A task's items encoded once for a tokenizer and a model length: what each evaluation scores."""

    name: str
    items: list[Item]
    rows: list[Row]

    @classmethod
    def build(cls, name: str, items: Sequence[Item], tokenizer: Tokenizer, max_length: int) -> PreparedTask:
        encoded = [[encode_pair(tokenizer, context, c) for context, c in it.pairs()] for it in items]
        return cls(name, list(items), plan_rows(encoded, max_length))


def metrics(items: Sequence[Item], results: Sequence[Sequence[tuple[float, bool]]]) -> dict:
    """{"acc", "acc_norm", "n"} for multiple choice, {"acc", "perplexity", "n"} for cloze, {"acc", "n"} for schema
    items (the harness reports no acc_norm for Winograd-style tasks)."""
    if items[0].contexts is not None:
        return {"acc": float(np.mean([np.argmax([ll for ll, _ in r]) == it.label for it, r in zip(items, results)])),
                "n": len(items)}
    if items[0].group is not None:  # C-Eval, CMMLU: over all items, and each subject's acc
        plain = [replace(it, group=None) for it in items]
        out = metrics(plain, results)
        out["subjects"] = {}
        for g in dict.fromkeys(it.group for it in items):
            mine = [(p, r) for p, it, r in zip(plain, items, results) if it.group == g]
            out["subjects"][g] = metrics([p for p, _ in mine], [r for _, r in mine])["acc"]
        return out
    if items[0].cloze:
        lls = [r[0][0] for r in results]
        return {"acc": float(np.mean([r[0][1] for r in results])),
                "perplexity": math.exp(-float(np.mean(lls))), "n": len(items)}
    acc, acc_norm = [], []
    for it, r in zip(items, results):
        lls = np.array([ll for ll, _ in r])
        acc.append(float(np.argmax(lls) == it.label))
        acc_norm.append(float(np.argmax(lls / np.array([float(len(c)) for c in it.choices])) == it.label))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(items)}


def score_task(model: torch.nn.Module, task: PreparedTask, batch_size: int, device,
               progress: Callable[[int], None] | None = None,
               ranks: tuple[int, int] = (0, 1)) -> tuple[dict, list[list[tuple[float, bool]]]]:
    """The task's metrics and every continuation's (log-likelihood, greedy) for the model; ranks (rank, world):
    each rank scores its share of the batches (score_rows)."""
    results = score_rows(model, task.rows, [len(it.pairs()) for it in task.items], batch_size, device, progress,
                         ranks)
    return metrics(task.items, results), results


def task_labels(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """What each (task, file) is called in scores and metrics: the task's name, or NAME:FILE-STEM for a task given
    with several files (two `choice` files of your own: choice:quiz, choice:trivia). The same file twice is a
    mistake."""
    seen = set()
    for name, path in pairs:
        if (name, str(Path(path).resolve())) in seen:
            raise DataError(f"--task {name} {path} is given twice; give each task file once")
        seen.add((name, str(Path(path).resolve())))
    counts = {name: sum(n == name for n, _ in pairs) for name, _ in pairs}
    labels = [f"{name}:{Path(path).stem}" if counts[name] > 1 else name for name, path in pairs]
    if len(set(labels)) < len(labels):
        clash = next(label for label in labels if labels.count(label) > 1)
        raise DataError(f"two task files would both be called {clash!r} (the same name in different folders); "
                          "rename one of them")
    return labels


def prepare_tasks(specs: Sequence[str], limit: int | None, tokenizer: Tokenizer, max_length: int) -> list[PreparedTask]:
    """--eval-task NAME=FILE values, read (the first `limit` items) and encoded for training-time evaluation."""
    pairs = [spec.partition("=")[::2] for spec in specs]
    return [PreparedTask.build(label, read_task(name, path, limit), tokenizer, max_length)
            for label, (name, path) in zip(task_labels(pairs), pairs)]


def format_scores(scores: dict[str, dict]) -> str:
    """One line: "hellaswag acc 0.2500 acc_norm 0.2700 (n 100) | lambada ..."."""
    return " | ".join(f"{name} " + " ".join(f"{k} {v:.4f}" for k, v in s.items() if isinstance(v, float))
                      + f" (n {s['n']})" for name, s in scores.items())


def evaluate_tasks(source, tasks: Sequence[tuple[str, str]], cfg, log=print) -> dict[str, dict]:
    """`gptforge eval SOURCE --task NAME FILE ...`: each task's metrics for the model in source (any format
    weights.load_any reads), with cfg (an EvalConfig) giving --limit, --batch-size, --context-length, --device
    and --tokenizer; a tqdm bar per task (to stderr). All files are read and encoded before the model runs."""
    from tqdm import tqdm

    from ..devices import pick_device
    from ..weights import load_for_text

    device = pick_device(cfg.device)
    fewshot_files = dict(spec.partition("=")[::2] for spec in cfg.fewshot_file)
    items = {label: task_items(name, path, cfg.limit, cfg.num_fewshot, fewshot_files)  # bad files fail before loading
             for label, (name, path) in zip(task_labels(tasks), tasks)}
    model, tokenizer, _ = load_for_text(source, device, tokenizer=cfg.tokenizer)
    max_length = cfg.context_length or model.cfg.context_length
    if max_length > model.cfg.context_length:
        raise DataError(f"--context-length {max_length} must be between 1 and the model's "
                        f"{model.cfg.context_length}")
    prepared = [PreparedTask.build(name, its, tokenizer, max_length) for name, its in items.items()]
    out = {}
    for task in prepared:
        with tqdm(total=len(task.rows), desc=task.name, unit="row", leave=False) as bar:
            out[task.name], _ = score_task(model, task, cfg.batch_size, device, bar.update)
        log(format_scores({task.name: out[task.name]}))
    return out

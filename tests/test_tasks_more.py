"""The other built-in tasks — WinoGrande, WSC273 (schema: one continuation after each candidate context), COPA,
BoolQ, OpenBookQA, CommonsenseQA, Social IQa, ARC-Challenge — against lm-evaluation-harness's own task YAMLs on
the same exported models, at 0 and at 5 shots: per-continuation log-likelihoods within 1e-4, the same contexts,
the same accuracies. Items are synthesised in each task's published layout; the harness reads them in its
Hugging Face datasets' layout (harness_layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_fewshot import LONG, long_hf  # noqa: F401  (tiny GPT-2 and llama exports with a 512-token context)
from test_tasks import ARC, assert_same_lls, write_jsonl

from gptforge.data import DataError
from gptforge.evaluate.tasks import PreparedTask, read_task, score_task, task_items
from gptforge.weights import load_for_text

SHOTS = 5

WINOGRANDE = [
    {"qID": "a", "sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"qID": "b", "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"qID": "c", "sentence": "He poured water from the bottle into the cup until the _ was empty.",
     "option1": "bottle", "option2": "cup", "answer": "1"},
    {"qID": "d", "sentence": "_ was happy because the gift arrived.", "option1": "Tom", "option2": "The dog",
     "answer": "2"},
]
WSC273 = [
    {"text": "The city councilmen refused the demonstrators a permit because they feared violence.",
     "pronoun": "they", "pronoun_loc": 63, "quote": "they feared violence", "quote_loc": 63,
     "options": ["The city councilmen", "The demonstrators"], "label": 0, "source": "(Winograd and Davis 2012)"},
    {"text": "The trophy doesn't fit into the brown suitcase because  it is too large.", "pronoun": "it",
     "pronoun_loc": 55, "quote": "it is too large", "quote_loc": 55, "options": ["the trophy", "the suitcase"],
     "label": 0, "source": "x"},
    {"text": "Joan made sure to thank Susan for all the help she had received. His dog barked.", "pronoun": "His",
     "pronoun_loc": 65, "quote": "His dog", "quote_loc": 65, "options": ["Joan", "Susan"], "label": 1,
     "source": "x"},
    {"text": "Paul tried to call George on the phone, but he wasn't successful.", "pronoun": "he",
     "pronoun_loc": 44, "quote": "he wasn't", "quote_loc": 44, "options": ["Paul", "George"], "label": 0,
     "source": "x"},
]
WSC273 += [{**r, "text": r["text"] + f" ({k})"} for k, r in enumerate(WSC273[:3])]  # 5-shot draws from these
COPA = [
    {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
     "choice2": "The grass was cut.", "question": "cause", "label": 0, "idx": 0},
    {"premise": "The woman tolerated her friend's difficult behavior.", "choice1": "The woman knew her friend was "
     "going through a hard time.", "choice2": "The woman felt that her friend took advantage of her kindness.",
     "question": "cause", "label": 0, "idx": 1},
    {"premise": "The women met for coffee.", "choice1": "The cafe reopened in a new location.",
     "choice2": "They wanted to catch up with each other.", "question": "cause", "label": 1, "idx": 2},
    {"premise": "The runner wore shorts.", "choice1": "The forecast predicted high temperatures.",
     "choice2": "She planned to run along the beach.", "question": "effect", "label": 0, "idx": 3},
]
BOOLQ = [
    {"question": "is the sky blue on a clear day", "passage": "The sky appears blue because of Rayleigh "
     "scattering of sunlight.", "idx": 0, "label": True},
    {"question": "do penguins fly", "passage": "Penguins are flightless birds that live in the south.", "idx": 1,
     "label": False},
    {"question": "is water wet", "passage": "Water is a liquid.", "idx": 2, "label": True},
]
OPENBOOKQA = [{**r, "answerKey": " " + r["answerKey"]} if k == 0 else r for k, r in enumerate(ARC)]
COMMONSENSEQA = [
    {"answerKey": "A", "id": "q1", "question": {"question_concept": "revolving door", "stem": "A revolving door is "
     "convenient for two direction travel, but it also serves as a security measure at a what? ", "choices": [
        {"label": "A", "text": "bank"}, {"label": "B", "text": "library"}, {"label": "C", "text": "department store"},
        {"label": "D", "text": "mall"}, {"label": "E", "text": "new york"}]}},
    {"answerKey": "C", "id": "q2", "question": {"question_concept": "people", "stem": "What do people aim to do at "
     "work?", "choices": [{"label": "A", "text": "complete job"}, {"label": "B", "text": "learn from each other"},
                         {"label": "C", "text": "kill animals"}, {"label": "D", "text": "wear hats"},
                         {"label": "E", "text": "talk to each other"}]}},
    {"answerKey": "E", "id": "q3", "question": {"question_concept": "x", "stem": "Where is a cat?", "choices": [
        {"label": "A", "text": "sky"}, {"label": "B", "text": "sea"}, {"label": "C", "text": "moon"},
        {"label": "D", "text": "sun"}, {"label": "E", "text": "sofa"}]}},
]
SIQA = [
    {"context": "Tracy didn't go home that evening and resisted Riley's attacks.", "question": "What does Tracy "
     "need to do before this?", "answerA": "make a new plan", "answerB": "Go home and see Riley",
     "answerC": "Find somewhere to go"},
    {"context": "Sydney walked past a homeless woman asking for change.", "question": "How would you describe "
     "Sydney?", "answerA": "sympathetic", "answerB": "like a person who was unable to help",
     "answerC": "incredulous"},
    {"context": "Sasha protected the patients' rights.", "question": "What will patients want to do next?",
     "answerA": "write a letter", "answerB": "get petitions signed", "answerC": "live longer"},
]
SIQA_LABELS = ["3", "1", "2"]


FIELD = {"winogrande": "sentence", "copa": "premise", "boolq": "passage", "siqa": "context"}


def more(task: str, records: list[dict], n: int = 7) -> list[dict]:
    """A train split: n records made by numbering a text field of each."""
    out = []
    for k in range(n):
        r = json.loads(json.dumps(records[k % len(records)]))  # a deep copy
        if task in FIELD:
            r[FIELD[task]] = f"{k}. " + r[FIELD[task]]
        else:
            r["question"]["stem"] = f"{k}. " + r["question"]["stem"]
        out.append(r)
    return out


# (our task, the harness's task YAML, the evaluated split, records, labels file, has a train split)
TASKS = [("winogrande", "winogrande/default.yaml", "validation", WINOGRANDE, None, True),
         ("wsc273", "wsc273/default.yaml", "test", WSC273, None, False),
         ("copa", "super_glue/copa/default.yaml", "validation", COPA, None, True),
         ("boolq", "super_glue/boolq/default.yaml", "validation", BOOLQ, None, True),
         ("openbookqa", "openbookqa/openbookqa.yaml", "test", OPENBOOKQA, None, True),
         ("commonsenseqa", "commonsense_qa/default.yaml", "validation", COMMONSENSEQA, None, True),
         ("siqa", "siqa/siqa.yaml", "validation", SIQA, SIQA_LABELS, True),
         ("arc-challenge", "arc/arc_challenge.yaml", "test", ARC, None, True)]


def harness_layout(task: str, records: list[dict], labels: list[str] | None) -> list[dict]:
    """The records as the harness's Hugging Face datasets hold them."""
    if task in ("openbookqa", "arc-challenge", "commonsenseqa"):
        key = "question_stem" if task == "openbookqa" else "question"
        return [{"id": r["id"], key: r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in records]
    if task == "boolq":
        return [{**r, "label": int(r["label"])} for r in records]
    if task == "siqa":
        return [{**r, "label": label} for r, label in zip(records, labels)]
    return records


def write_task(d: Path, task: str, split: str, records, labels) -> Path:
    path = write_jsonl(d / f"{split}.jsonl", records)
    if labels is not None:
        (d / f"{split}-labels.lst").write_text("\n".join(labels) + "\n")
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    out = {}
    for task, _, split, records, labels, has_train in TASKS:
        d = tmp_path_factory.mktemp(task)
        train = write_task(d, task, "train", more(task, records), None if labels is None else
                           [labels[k % len(labels)] for k in range(7)]) if has_train else None
        out[task] = (write_task(d, task, split, records, labels), train)
    return out


def run_harness(hf_dir: Path, include: Path, shots: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    official = Path(lm_eval.__file__).parent / "tasks"
    for task, yaml, split, records, labels, has_train in TASKS:
        files = {split: write_jsonl(include / f"{task}.jsonl", harness_layout(task, records, labels))}
        if has_train:
            train_labels = None if labels is None else [labels[k % len(labels)] for k in range(7)]
            files["train"] = write_jsonl(include / f"{task}_train.jsonl", harness_layout(task, more(task, records),
                                                                                         train_labels))
        splits = "".join(f"{s}_split: {s if s in files else 'null'}\n" for s in ("validation", "test"))
        splits += f"training_split: {'train' if has_train else 'null'}\n"
        data_files = "".join(f"    {s}: {f}\n" for s, f in files.items())
        (include / f"{task}_local.yaml").write_text(
            f"include: {official / yaml}\ntask: {task}_local\ntag: null\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data_files}{splits}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4)
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"{t[0]}_local" for t in TASKS], num_fewshot=shots,
                                      log_samples=True,
                                      task_manager=TaskManager(include_path=str(include), include_defaults=False))
    samples = {t[0]: sorted(out["samples"][f"{t[0]}_local"], key=lambda s: s["doc_id"]) for t in TASKS}
    return {t: (out["results"][f"{t}_local"], [[tuple(r[0]) for r in s["resps"]] for s in samples[t]],
                [s["arguments"] for s in samples[t]]) for t in samples}


@pytest.fixture(scope="module", params=[0, SHOTS], ids=["0-shot", f"{SHOTS}-shot"])
def harness(request, long_hf, tmp_path_factory):  # noqa: F811
    pytest.importorskip("lm_eval")
    return request.param, run_harness(long_hf, tmp_path_factory.mktemp("harness-more"), request.param)


@pytest.mark.parametrize("task", [t[0] for t in TASKS])
def test_task_agrees_with_the_harness(long_hf, task_files, harness, task):  # noqa: F811
    shots, theirs = harness
    path, train = task_files[task]
    items = task_items(task, path, None, shots, {task: str(train)} if train else {})
    their_metrics, their_results, their_requests = theirs[task]
    assert [it.pairs() for it in items] == their_requests
    model, tokenizer, _ = load_for_text(long_hf)
    metrics, results = score_task(model, PreparedTask.build(task, items, tokenizer, LONG), 3, "cpu")
    assert_same_lls(results, their_results)
    assert metrics["acc"] == their_metrics["acc,none"]
    if "acc_norm,none" in their_metrics:
        assert metrics["acc_norm"] == their_metrics["acc_norm,none"]


def test_choice_format_schema_scores_as_winogrande(long_hf, task_files, tmp_path):  # noqa: F811
    """Our `choice` format's schema records ({"contexts", "continuation", "label"}) are WinoGrande's items."""
    wino = read_task("winogrande", task_files["winogrande"][0])
    path = write_jsonl(tmp_path / "schema.jsonl", [{"contexts": it.contexts, "continuation": it.choices[0],
                                                    "label": it.label} for it in wino])
    model, tokenizer, _ = load_for_text(long_hf)
    mine = [score_task(model, PreparedTask.build("t", items, tokenizer, LONG), 2, "cpu")
            for items in (read_task("choice", path), wino)]
    assert mine[0][0] == mine[1][0] and set(mine[0][0]) == {"acc", "n"}
    assert_same_lls(mine[0][1], mine[1][1])


BAD = [
    ("winogrande", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n', "has no '_'"),
    ("winogrande", '{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}\n', "field 'answer'"),
    ("copa", '{"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}\n',
     "field 'question' must be 'cause' or 'effect'"),
    ("boolq", '{"passage": "p", "question": "q"}\n', "no field 'label' (or 'answer')"),
    ("commonsenseqa", '{"question": {"stem": "s", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": '
                      '"b"}]}, "answerKey": "A"}\n', "must hold 5 choices"),
    ("siqa", '{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}\n',
     "no labels file (dev-labels.lst beside dev.jsonl)"),
    ("choice", '{"contexts": ["a"], "continuation": "c", "label": 0}\n', "'contexts' must be a list of at least 2"),
    ("choice", '{"contexts": ["a", "b"], "continuation": "c", "label": 0}\n{"context": "c", "continuation": "d"}\n',
     "mixes schema and cloze records"),
]


@pytest.mark.parametrize("task, text, message", BAD)
def test_malformed_records_name_file_line_and_field(tmp_path, task, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        read_task(task, path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)

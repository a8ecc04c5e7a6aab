"""Downstream tasks: gptforge's scores equal lm-evaluation-harness's on the same files and the same model.

Small files in each official format are written here; a tiny GPT-2 (GPT-2's tokenizer) and a tiny
Qwen3-shaped llama (minimind's tokenizer) are exported with `to_hf`, and lm-evaluation-harness scores
the exported directory offline: `simple_evaluate` on local task configs that `include` the
harness's own task YAMLs (its prompts, its process_docs) with the data files swapped for ours, and
`HFLM.loglikelihood` for our own `choice` format. Per-continuation log-likelihoods must agree within
1e-4 and acc / acc_norm / LAMBADA's acc and perplexity exactly (perplexity to 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import run
from minimind_like import tokenizer_dir

from gptforge.data import DataError
from gptforge.evaluate.tasks import PreparedTask, read_task, score_task
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.tokenizer import get_tokenizer
from gptforge.weights import load_for_text, to_hf

MINIMIND = tokenizer_dir()  # minimind_like.py: a tokenizer with the properties of minimind's
CONTEXT = 48  # short enough that the long HellaSwag item below is cut from the left

HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs "
     "the pole.", "ctx_b": "the lady", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the bar.",
                 "stands and lifts the weight over her head."]},
    {"ind": 106, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a [title] Grill. [step] Heat "
     "it up.", "ctx_b": "", "label": "0", "endings": ["[substeps] Scrub  the grates.", "Eat the grill.",
                                                     "Paint it [title] blue.", "Leave it."]},
    {"ind": 7, "activity_label": "Long context", "ctx_a": " ".join(["The quick brown fox jumps over the dog."] * 6),
     "ctx_b": "THEN the fox", "label": 1, "endings": ["sleeps.", "runs away into the forest.", "sits.", "eats."]},
]
LAMBADA = [
    {"text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel"},
    {"text": "\"Why?\" \"I would have thought you'd find him rather dry,\" she said. \"I don't know about that,\" "
             "said Gabriel"},
    {"text": "Both its sun-speckled shade and the cool grass beneath were a welcome respite after the stifling "
             "kitchen, and I was glad to relax against the tree"},
]
ARC = [
    {"id": "Mercury_7175875", "question": {"stem": "An astronomer observes that a planet rotates faster after a "
     "meteorite impact. Which is the most likely effect of this increase in rotation?", "choices": [
        {"text": "Planetary density will decrease.", "label": "A"}, {"text": "Planetary years will become longer.",
                                                                     "label": "B"},
        {"text": "Planetary days will become shorter.", "label": "C"},
        {"text": "Planetary gravity will become stronger.", "label": "D"}]}, "answerKey": "C"},
    {"id": "NYSEDREGENTS_2015_4_1", "question": {"stem": "Which object is the best conductor of electricity?",
     "choices": [{"text": "a wax crayon", "label": "1"}, {"text": "a plastic spoon", "label": "2"},
                 {"text": "a rubber eraser", "label": "3"}, {"text": "an iron nail", "label": "4"}]},
     "answerKey": "4"},
    {"id": "x3", "question": {"stem": "What do plants need?", "choices": [{"text": "light", "label": "A"},
     {"text": "noise", "label": "B"}, {"text": "darkness and cold", "label": "C"}]}, "answerKey": "A"},
]
PIQA = [
    {"goal": "How do I ready a guinea pig cage for it's new occupants?",
     "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
     "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material."},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "},
    {"goal": "To make a hard boiled egg,", "sol1": "boil it for ten minutes.", "sol2": "fry it for ten minutes."},
]
PIQA_LABELS = ["0", "1", "0"]
CHOICE = [
    {"context": "The capital of France is", "choices": ["Paris.", "Rome.", "a cheese."], "label": 0},
    {"context": "2 + 2 =", "choices": ["4", "five", "22"], "label": 0, "delimiter": " "},
    {"context": "Colour:", "choices": [" red", " blue"], "label": 1, "delimiter": ""},
]
CLOZE = [
    {"context": "The cat sat on the", "continuation": "mat"},
    {"context": "", "continuation": "Once upon a time"},
    {"context": "Trailing space moves to the continuation ", "continuation": "here", "delimiter": ""},
]


CHOICE_YAML = """task: choice_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def harness_records(task: str) -> list[dict]:
    """The same items in the Hugging Face datasets' layout the harness's task YAMLs read."""
    if task == "arc_easy":
        return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in ARC]
    if task == "piqa":
        return [{**r, "label": int(label)} for r, label in zip(PIQA, PIQA_LABELS)]
    return {"hellaswag": HELLASWAG, "lambada_openai": LAMBADA}[task]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tasks")
    (d / "valid-labels.lst").write_text("\n".join(PIQA_LABELS) + "\n")
    return {"hellaswag": write_jsonl(d / "hellaswag_val.jsonl", HELLASWAG),
            "lambada": write_jsonl(d / "lambada_test.jsonl", LAMBADA),
            "arc-easy": write_jsonl(d / "ARC-Easy-Test.jsonl", ARC),
            "piqa": write_jsonl(d / "valid.jsonl", PIQA),
            "choice": write_jsonl(d / "choice.jsonl", CHOICE),
            "cloze": write_jsonl(d / "cloze.jsonl", CLOZE)}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    if request.param == "gpt2":
        model, tok = GPT(GPTConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=32, n_heads=2, n_layers=2,
                                   drop_rate=0.0)), "gpt2"
    else:
        model = Llama(LlamaConfig(vocab_size=6400, context_length=CONTEXT, emb_dim=32, n_heads=4, n_kv_heads=2,
                                  n_layers=2, intermediate_size=64, qk_norm=True))
        tok = get_tokenizer(str(MINIMIND / "tokenizer.json"))
    for p in model.parameters():  # larger weights than the init: choices differ clearly, no near-ties
        p.data.normal_(0, 0.3)
    return to_hf(model, tmp_path_factory.mktemp(request.param) / "hf", tok)


@pytest.fixture(scope="module")
def harness(hf_dir, files, tmp_path_factory):
    """lm-evaluation-harness's per-document responses and metrics for each task, and its HFLM (offline)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        return run_harness(hf_dir, tmp_path_factory)


def run_harness(hf_dir, tmp_path_factory):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    official = Path(lm_eval.__file__).parent / "tasks"
    include = tmp_path_factory.mktemp("harness-tasks")
    names = {"hellaswag": "hellaswag/hellaswag.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
             "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml"}
    for name, yaml in names.items():
        data = write_jsonl(include / f"{name}.jsonl", harness_records(name))
        split = "test" if name in ("lambada_openai", "arc_easy") else "validation"
        splits = "".join(f"{s}_split: {s if s == split else 'null'}\n" for s in ("training", "validation", "test"))
        (include / f"{name}_local.yaml").write_text(
            f"include: {official / yaml}\ntask: {name}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n{splits}")
    # docs/eval.md's task config for our own multiple-choice format (records without a "delimiter" of their own)
    (include / "choice_local.yaml").write_text(CHOICE_YAML.format(file=write_jsonl(include / "c.jsonl", CHOICE[:2])))
    names["choice"] = None
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"{n}_local" for n in names], num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(include), include_defaults=False))
    per_doc = {n: [s["resps"] for s in sorted(out["samples"][f"{n}_local"], key=lambda s: s["doc_id"])]
               for n in names}
    return {n: (out["results"][f"{n}_local"], [[tuple(r[0]) for r in doc] for doc in per_doc[n]]) for n in names}, lm


def ours(hf_dir: Path, task: str, path: Path, batch_size: int = 3):
    model, tokenizer, _ = load_for_text(hf_dir)
    prepared = PreparedTask.build(task, read_task(task, path), tokenizer, model.cfg.context_length)
    return score_task(model, prepared, batch_size, "cpu")


def assert_same_lls(mine, theirs):
    assert [len(d) for d in mine] == [len(d) for d in theirs]
    for a, b in zip(mine, theirs):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b):
            assert ll_a == pytest.approx(ll_b, abs=1e-4)
            assert greedy_a == greedy_b


@pytest.mark.parametrize("task, theirs", [("hellaswag", "hellaswag"), ("arc-easy", "arc_easy"), ("piqa", "piqa"),
                                         ("choice", "choice")])
def test_multiple_choice_agrees_with_the_harness(hf_dir, files, harness, task, theirs, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", CHOICE[:2]) if task == "choice" else files[task]
    metrics, results = ours(hf_dir, task, path)
    their_metrics, their_results = harness[0][theirs]
    assert_same_lls(results, their_results)
    assert metrics["n"] == their_metrics["sample_len"]
    assert metrics["acc"] == their_metrics["acc,none"]
    assert metrics["acc_norm"] == their_metrics["acc_norm,none"]


def test_lambada_agrees_with_the_harness(hf_dir, files, harness):
    metrics, results = ours(hf_dir, "lambada", files["lambada"], batch_size=2)
    their_metrics, their_results = harness[0]["lambada_openai"]
    assert_same_lls(results, their_results)
    assert metrics["acc"] == their_metrics["acc,none"]
    assert metrics["perplexity"] == pytest.approx(their_metrics["perplexity,none"], rel=1e-6)


def test_choice_format_agrees_with_hflm_requests(hf_dir, files, harness):
    """Our own format (multiple choice and cloze, an empty context, a context's trailing space) scored as the
    harness's HFLM.loglikelihood scores the same (context, delimiter + choice) requests."""
    from lm_eval.api.instance import Instance

    lm = harness[1]
    for name in ("choice", "cloze"):
        items = read_task("choice", files[name])
        requests = [Instance("loglikelihood", {}, (it.context, c), k)
                    for it in items for k, c in enumerate(it.continuations())]
        flat = iter(lm.loglikelihood(requests, disable_tqdm=True))
        theirs = [[next(flat) for _ in it.choices] for it in items]
        _, results = ours(hf_dir, "choice", files[name], batch_size=2)
        assert_same_lls(results, theirs)


def test_batch_size_does_not_change_the_numbers(hf_dir, files):
    one = ours(hf_dir, "hellaswag", files["hellaswag"], batch_size=1)
    many = ours(hf_dir, "hellaswag", files["hellaswag"], batch_size=8)
    assert one[0] == many[0]
    assert_same_lls(one[1], many[1])


BAD = [
    ("hellaswag", '{"ctx_a": "x", "ctx_b": "y", "activity_label": "z", "endings": ["a", "b"]}\n', "no field 'label'"),
    ("hellaswag", '{"ctx_a": "x", "activity_label": "z", "endings": ["a", "b"], "label": 0}\n', "no field 'ctx_b'"),
    ("hellaswag", '{"ctx_a": "x", "ctx_b": "y", "activity_label": "z", "endings": ["a", "b"], "label": 2}\n',
     "field 'label' must be the index of a choice, 0 to 1"),
    ("lambada", '{"text": "a b"}\n{"txt": "a b"}\n', "no field 'text'"),
    ("lambada", '{"text": "one"}\n', "at least two words"),
    ("lambada", "not json\n", "not a JSON record"),
    ("arc-easy", '{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, '
                 '"answerKey": "E"}\n', "field 'answerKey' 'E' is none of the choices' labels"),
    ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b"}\n', "no field 'label' and no labels file"),
    ("choice", '{"context": "c", "choices": ["a"], "label": 0}\n', "field 'choices' must be a list of at least 2"),
    ("choice", '{"context": "c", "choices": ["a", "b"], "label": 0}\n{"context": "c", "continuation": "d"}\n',
     "mixes multiple-choice and cloze records"),
]


@pytest.mark.parametrize("task, text, message", BAD)
def test_malformed_files_name_file_line_and_field(tmp_path, task, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as e:
        read_task(task, path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    if "mixes" not in message:
        line = len(text.splitlines())
        assert str(e.value).startswith(f"{path}:{line}:")


def test_missing_file_says_what_the_task_expects(tmp_path):
    with pytest.raises(DataError, match="no such file; task hellaswag expects hellaswag_val.jsonl"):
        read_task("hellaswag", tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- during training, the CLI


def test_eval_task_during_training_reaches_metrics_plot_trackers_and_report(text_file, files, tmp_path, capsys):
    from gptforge.runs.report import write_report
    from gptforge.runs.trackers import scalars

    out = tmp_path / "run"
    code, stdout, err = run(["train", str(text_file), "--out", str(out), "--context-length", "32", "--emb-dim", "32",
                             "--n-heads", "2", "--n-layers", "2", "--max-steps", "4", "--eval-every", "2",
                             "--eval-batches", "1", "--sample-tokens", "0", "--batch-size", "2", "--no-progress",
                             "--device", "cpu", "--eval-task", f"choice={files['choice']}",
                             "--eval-task", f"lambada={files['lambada']}", "--eval-task-limit", "2"], capsys)
    assert code == 0, err
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 0 <= r["task/choice/acc"] <= 1 and 0 <= r["task/choice/acc_norm"] <= 1
        assert r["task/lambada/perplexity"] > 1 and "task/lambada/acc" in r
    assert "tasks: choice acc" in stdout and "(n 2)" in stdout
    assert (out / "tasks.png").stat().st_size > 0
    assert scalars(evals[-1])["task/choice/acc_norm"] == evals[-1]["task/choice/acc_norm"]
    page = write_report([out], tmp_path / "report.html").read_text()
    assert 'id="tasks"' in page and "choice/acc_norm" in page and "Downstream tasks (--eval-task)" in page


def test_eval_task_flag_is_checked_before_training(tmp_path):
    from gptforge.config import ConfigError
    from gptforge.training.config import TrainConfig

    with pytest.raises(ConfigError, match="--eval-task 'hellaswag' must be NAME=FILE"):
        TrainConfig(eval_task=["hellaswag"])
    with pytest.raises(ConfigError, match="NAME one of hellaswag, lambada"):
        TrainConfig(eval_task=["mmlu=x.jsonl"])


def test_eval_command_tasks_json_last_line_and_where_data_lives(hf_dir, files, capsys):

    code, out, err = run(["eval", str(hf_dir), "--task", "hellaswag", str(files["hellaswag"]),
                          "--task", f"lambada={files['lambada']}", "--limit", "2", "--batch-size", "2"], capsys)
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"hellaswag", "lambada"} and last["hellaswag"]["n"] == 2 and last["lambada"]["n"] == 2
    assert set(last["hellaswag"]) == {"acc", "acc_norm", "n"} and set(last["lambada"]) == {"acc", "perplexity", "n"}
    code, out, _ = run(["eval", str(hf_dir), "--task", "piqa", "--task", "arc-challenge"], capsys)
    assert code == 0 and "valid-labels.lst" in out and "ARC-Challenge-Test.jsonl" in out
    code, _, err = run(["eval", str(hf_dir), "--task", "piqa", "--task", "lambada", str(files["lambada"])], capsys)
    assert code == 1 and err.count("\n") == 1 and "one FILE after each NAME" in err
    code, _, err = run(["eval", str(hf_dir), "--task", "mmlu", "x.jsonl"], capsys)
    assert code == 1 and "unknown task 'mmlu'" in err


def test_two_choice_files_are_both_scored_under_their_own_names(hf_dir, files, capsys):
    # a file of cloze items and one of multiple choice, both in the `choice` format: each scored on its own
    code, out, err = run(["eval", str(hf_dir), "--task", f"choice={files['choice']}", "--task",
                          f"choice={files['cloze']}", "--limit", "2", "--batch-size", "2"], capsys)
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"choice:choice", "choice:cloze"}
    alone = json.loads(run(["eval", str(hf_dir), "--task", f"choice={files['cloze']}", "--limit", "2",
                            "--batch-size", "2"], capsys)[1].strip().splitlines()[-1])
    assert alone == {"choice": last["choice:cloze"]}  # the same scores; one file alone keeps the name choice

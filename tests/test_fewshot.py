"""Few-shot downstream tasks: gptforge's contexts and scores equal lm-evaluation-harness's with the same
--num-fewshot, on the same exported models (a tiny GPT-2 and a tiny Qwen3-shaped llama, with a context long
enough to hold five examples). The harness reads local task configs that `include` its own YAMLs with train
files beside the evaluated ones, so its sampler draws from the same pools with its default seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clirun import run
from test_tasks import (
    ARC,
    CHOICE_YAML,
    HELLASWAG,
    LAMBADA,
    MINIMIND,
    PIQA,
    PIQA_LABELS,
    assert_same_lls,
    harness_records,
    write_jsonl,
)

from gptforge.config import ConfigError
from gptforge.evaluate import EvalConfig
from gptforge.evaluate.tasks import PreparedTask, score_task, task_items
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.tokenizer import get_tokenizer
from gptforge.weights import load_for_text, to_hf

SHOTS = 5
LONG = 512


def variants(records: list[dict], key, n: int) -> list[dict]:
    """n records made from records by changing a text field (`key(record, k)` gives the changed record)."""
    return [key(records[k % len(records)], k) for k in range(n)]


HELLASWAG_TRAIN = HELLASWAG[:2] + variants(HELLASWAG, lambda r, k: {**r, "activity_label": f"Task {k}"}, 6)
ARC_TRAIN = variants(ARC, lambda r, k: {**r, "id": f"t{k}", "question": {**r["question"], "stem": f"{k}: "
                                                                         + r["question"]["stem"]}}, 7)
PIQA_TRAIN = PIQA[:1] + variants(PIQA, lambda r, k: {**r, "goal": f"Step {k}. " + r["goal"]}, 6)
PIQA_TRAIN_LABELS = PIQA_LABELS[:1] + [PIQA_LABELS[k % 3] for k in range(6)]
LAMBADA_MORE = LAMBADA + variants(LAMBADA, lambda r, k: {"text": f"Part {k}. " + r["text"]}, 4)
CHOICE_MORE = [{"context": f"Fact {k}: the capital of France is", "choices": ["Paris.", "Rome.", "a cheese."],
                "label": 0} for k in range(4)] + [{"context": "2 + 2 =", "choices": ["4", "five", "22"], "label": 0},
                                                  {"context": "Snow is", "choices": ["white", "green"], "label": 0}]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def long_hf(request, tmp_path_factory) -> Path:
    torch.manual_seed(1)
    if request.param == "gpt2":
        model, tok = GPT(GPTConfig(vocab_size=50257, context_length=LONG, emb_dim=32, n_heads=2, n_layers=2,
                                   drop_rate=0.0)), "gpt2"
    else:
        model = Llama(LlamaConfig(vocab_size=6400, context_length=LONG, emb_dim=32, n_heads=4, n_kv_heads=2,
                                  n_layers=2, intermediate_size=64, qk_norm=True))
        tok = get_tokenizer(str(MINIMIND / "tokenizer.json"))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return to_hf(model, tmp_path_factory.mktemp(request.param) / "hf", tok)


@pytest.fixture(scope="module")
def fewshot_files(tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    """Each task's evaluated file and train file (our readers' layouts)."""
    d = tmp_path_factory.mktemp("fewshot")
    (d / "valid-labels.lst").write_text("\n".join(PIQA_LABELS) + "\n")
    (d / "train-labels.lst").write_text("\n".join(PIQA_TRAIN_LABELS) + "\n")
    return {"hellaswag": (write_jsonl(d / "hellaswag_val.jsonl", HELLASWAG),
                          write_jsonl(d / "hellaswag_train.jsonl", HELLASWAG_TRAIN)),
            "arc-easy": (write_jsonl(d / "ARC-Easy-Test.jsonl", ARC),
                         write_jsonl(d / "ARC-Easy-Train.jsonl", ARC_TRAIN)),
            "piqa": (write_jsonl(d / "valid.jsonl", PIQA), write_jsonl(d / "train.jsonl", PIQA_TRAIN)),
            "lambada": (write_jsonl(d / "lambada_test.jsonl", LAMBADA_MORE), None),
            "choice": (write_jsonl(d / "choice.jsonl", CHOICE_MORE), None)}


def harness_train(name: str) -> list[dict]:
    if name == "arc_easy":
        return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in ARC_TRAIN]
    if name == "piqa":
        return [{**r, "label": int(label)} for r, label in zip(PIQA_TRAIN, PIQA_TRAIN_LABELS)]
    return HELLASWAG_TRAIN


@pytest.fixture(scope="module")
def harness_fewshot(long_hf, tmp_path_factory):
    """lm-evaluation-harness's per-document responses and metrics at SHOTS shots."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    official = Path(lm_eval.__file__).parent / "tasks"
    include = tmp_path_factory.mktemp("harness-fewshot")
    names = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml",
             "lambada_openai": "lambada/lambada_openai.yaml"}
    for name, yaml in names.items():
        split = "test" if name in ("lambada_openai", "arc_easy") else "validation"
        files = {split: write_jsonl(include / f"{name}.jsonl", harness_records(name) if name != "lambada_openai"
                                    else LAMBADA_MORE)}
        if name != "lambada_openai":
            files["train"] = write_jsonl(include / f"{name}_train.jsonl", harness_train(name))
        splits = "".join(f"{s}_split: {s if s in files else 'null'}\n" for s in ("validation", "test"))
        splits += f"training_split: {'train' if 'train' in files else 'null'}\n"
        data_files = "".join(f"    {s}: {f}\n" for s, f in files.items())
        (include / f"{name}_local.yaml").write_text(
            f"include: {official / yaml}\ntask: {name}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data_files}{splits}")
    # README's config for our `choice` format, few-shot examples from the other items (fewshot_split: test)
    (include / "choice_local.yaml").write_text(CHOICE_YAML.format(file=write_jsonl(include / "c.jsonl", CHOICE_MORE))
                                               + "fewshot_split: test\n")
    names["choice"] = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        lm = HFLM(pretrained=str(long_hf), device="cpu", batch_size=4)
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"{n}_local" for n in names], num_fewshot=SHOTS,
                                      log_samples=True,
                                      task_manager=TaskManager(include_path=str(include), include_defaults=False))
    samples = {n: sorted(out["samples"][f"{n}_local"], key=lambda s: s["doc_id"]) for n in names}
    return {n: (out["results"][f"{n}_local"], [[tuple(r[0]) for r in s["resps"]] for s in samples[n]],
                [s["arguments"] for s in samples[n]]) for n in names}


@pytest.mark.parametrize("task, theirs", [("hellaswag", "hellaswag"), ("arc-easy", "arc_easy"), ("piqa", "piqa"),
                                         ("lambada", "lambada_openai"), ("choice", "choice")])
def test_fewshot_agrees_with_the_harness(long_hf, fewshot_files, harness_fewshot, task, theirs):
    path, train = fewshot_files[task]
    items = task_items(task, path, None, SHOTS, {task: str(train)} if train else {})
    their_metrics, their_results, their_requests = harness_fewshot[theirs]
    for item, requests in zip(items, their_requests):  # the same contexts, the same continuations
        assert [(item.context, c) for c in item.continuations()] == requests
    model, tokenizer, _ = load_for_text(long_hf)
    metrics, results = score_task(model, PreparedTask.build(task, items, tokenizer, LONG), 3, "cpu")
    assert_same_lls(results, their_results)
    assert metrics["acc"] == their_metrics["acc,none"]
    if "acc_norm" in metrics:
        assert metrics["acc_norm"] == their_metrics["acc_norm,none"]
    else:
        assert metrics["perplexity"] == pytest.approx(their_metrics["perplexity,none"], rel=1e-6)


def test_fewshot_flags_on_the_command_line(long_hf, fewshot_files, capsys):
    path, train = fewshot_files["hellaswag"]
    code, out, err = run(["eval", str(long_hf), "--task", "hellaswag", str(path), "--num-fewshot", "2",
                          "--fewshot-file", f"hellaswag={train}", "--limit", "2"], capsys)
    assert code == 0, err and '"hellaswag"' in out.splitlines()[-1]
    code, _, err = run(["eval", str(long_hf), "--task", "hellaswag", str(path), "--num-fewshot", "2"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "hellaswag's examples come from its train split" in err and "--fewshot-file hellaswag=FILE" in err
    code, _, err = run(["eval", str(long_hf), "--task", "lambada", str(fewshot_files["lambada"][0]),
                        "--num-fewshot", "50"], capsys)
    assert code == 1 and "--num-fewshot 50 needs at least 50 examples to draw from, the few-shot pool has 7" in err
    with pytest.raises(ConfigError, match="--fewshot-file 'lambada=x' must be NAME=FILE with NAME one of hellaswag"):
        EvalConfig(fewshot_file=["lambada=x"])

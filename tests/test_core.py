"""The CORE suite: a DCLM eval bundle written here (four tasks: each kind few-shot, and a zero-shot one),
scored by gptforge and by a reference written below that follows nanochat's evaluator item by item: its
prompts rendered with jinja2, the Hugging Face tokenizer and transformers model of the same export, one
unbatched forward per prompt, the mean loss over the scored tokens, sequences cut from the left at the
context. CORE is checked against a hand computation from the accuracies and the bundle's baselines.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from clirun import run
from test_tasks import CONTEXT, hf_dir  # noqa: F401  (the exported tiny GPT-2 and llama models)

from gptforge.errors import DataError
from gptforge.evaluate.core import PreparedCore, core_score, read_bundle, read_items, score_core_task
from gptforge.weights import load_for_text

MC = [
    {"query": "The capital of France is", "choices": ["Paris", "Rome", "a cheese"], "gold": 0},
    {"query": "Water boils at", "choices": ["100 degrees", "3 degrees"], "gold": 0},
    {"query": "Question: which is a colour?\nAnswer:", "choices": ["red", "loud", "heavy", "fast"], "gold": 0},
    {"query": " ".join(["The quick brown fox jumps over the lazy dog."] * 4) + " Then it",
     "choices": ["slept soundly.", "ran into the forest and hid."], "gold": 1},
    {"query": "A cat says", "choices": ["meow", "moo"], "gold": 0},
]
SCHEMA = [
    {"context_options": ["The trophy does not fit in the suitcase because the trophy",
                         "The trophy does not fit in the suitcase because the suitcase"],
     "continuation": "is too big.", "gold": 0},
    {"context_options": ["Anna gave Mary a gift because Anna", "Anna gave Mary a gift because Mary"],
     "continuation": "was kind.", "gold": 0},
    {"context_options": ["The man could not lift his son because the man",
                         "The man could not lift his son because the son"], "continuation": "was so weak.", "gold": 0},
    {"context_options": ["Dogs chase cats since dogs", "Dogs chase cats since cats"], "continuation": "run.",
     "gold": 1},
]
LM = [
    {"context": "One, two, three,", "continuation": "four"},
    {"context": "The sky is ", "continuation": "blue"},
    {"context": "Roses are red, violets are", "continuation": "blue"},
    {"context": "Once upon a", "continuation": "time"},
]
TASKS = [("mc_task", "multiple_choice", "mc.jsonl", 1, " ", 25.0, MC),
         ("schema_task", "schema", "schema/wino.jsonl", 1, " ", 50.0, SCHEMA),
         ("lm_task", "language_modeling", "lm.jsonl", 2, " ", 0.0, LM),
         ("lm_zeroshot", "language_modeling", "lm0.jsonl", 0, " ", 0.0, LM)]


def write_bundle(root: Path, tasks=TASKS) -> Path:
    (root / "eval_data" / "schema").mkdir(parents=True, exist_ok=True)
    lines = ["icl_tasks:"]
    for label, kind, uri, shots, delimiter, _, records in tasks:
        lines += [f"-\n  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: '{delimiter}'"]
        (root / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
        + "".join(f"{t[0]},cat,{t[1]},{t[3]},{len(t[6])},{t[5]},yes,synthesised\n" for t in tasks))
    return root


# ----------------------------------------------------------------------------- the reference: nanochat's algorithm


TEMPLATES = {
    "multiple_choice": "{% for e in shots %}{{ e.query }}{{ d }}{{ e.choices[e.gold] }}\n\n{% endfor %}"
                       "{{ item.query }}{{ d }}{{ option }}",
    "schema": "{% for e in shots %}{{ e.context_options[e.gold] }}{{ d }}{{ e.continuation }}\n\n{% endfor %}"
              "{{ option }}{{ d }}{{ item.continuation }}",
    "language_modeling": "{% for e in shots %}{{ e.context | trim }}{{ d }}{{ e.continuation }}\n\n{% endfor %}"
                         "{{ item.context | trim }}{{ d }}{% if option %}{{ item.continuation }}{% endif %}",
}


def reference_prompts(kind, item, d, shots):
    from jinja2 import Template

    t = Template(TEMPLATES[kind])
    if kind == "language_modeling":
        return [t.render(item=item, d=d, shots=shots, option=False).strip(),
                t.render(item=item, d=d, shots=shots, option=True)]
    options = item["choices"] if kind == "multiple_choice" else item["context_options"]
    return [t.render(item=item, d=d, shots=shots, option=o) for o in options]


def shared(seqs, reverse=False):
    seqs = [s[::-1] if reverse else s for s in seqs]
    n = 0
    while n < min(map(len, seqs)) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def reference_task(hf, tok, kind, records, shots_k, d, max_len):
    """Per item (right, mean losses), scored as nanochat's core_eval.evaluate_example does, one forward per
    prompt."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    data = list(records)
    random.Random(1337).shuffle(data)
    out = []
    for i, item in enumerate(data):
        shots = [data[j] for j in random.Random(1234 + i).sample([j for j in range(len(data)) if j != i], shots_k)]
        seqs = [[bos] + tok.encode(p, add_special_tokens=False) for p in reference_prompts(kind, item, d, shots)]
        if kind == "multiple_choice":
            spans = [(shared(seqs), len(s)) for s in seqs]
        elif kind == "schema":
            spans = [(len(s) - shared(seqs, reverse=True), len(s)) for s in seqs]
        else:
            assert seqs[1][:len(seqs[0])] == seqs[0]
            seqs, spans = seqs[1:], [(len(seqs[0]), len(seqs[1]))]
        losses, greedy = [], True
        for s, (a, b) in zip(seqs, spans):
            crop = max(0, len(s) - max_len)
            s, a, b = s[crop:], a - crop, b - crop
            with torch.no_grad():
                logits = hf(torch.tensor([s])).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(s[1:]), reduction="none")
            losses.append(nll[a - 1:b - 1].mean().item())
            greedy = bool((logits[a - 1:b - 1].argmax(-1) == torch.tensor(s[a:b])).all())
        right = greedy if kind == "language_modeling" else losses.index(min(losses)) == item["gold"]
        out.append((right, losses))
    return out


def greedy_lm_item(hf, tok) -> dict:
    """A language-modelling item the model gets right: a context whose greedy next token is a space and a word."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for context in ("It was", "We saw the", "Here is a", "They said", "In the", "My name is", "A long", "So the"):
        ids = [bos] + tok.encode(context, add_special_tokens=False)
        with torch.no_grad():
            g = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        word = tok.decode([g])
        if word.startswith(" ") and word[1:].isalpha() and tok.encode(context + word, add_special_tokens=False) \
                == ids[1:] + [g]:
            return {"context": context, "continuation": word[1:]}
    pytest.skip("no context found whose greedy continuation is a word")


@pytest.fixture(scope="module")
def hf_model(hf_dir):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval(), AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def tasks(hf_model):
    """The bundle's tasks, the zero-shot language-modelling one with an item the model gets right."""
    right = greedy_lm_item(*hf_model)
    return [t if t[0] != "lm_zeroshot" else (*t[:6], [*LM, right]) for t in TASKS]


def test_items_and_core_equal_the_reference(hf_dir, hf_model, tasks, tmp_path):  # noqa: F811
    bundle = write_bundle(tmp_path, tasks)
    model, tokenizer, _ = load_for_text(hf_dir)
    scores, n_cut, n_whole = {}, 0, 0
    for task, (label, kind, _, shots, d, baseline, records) in zip(read_bundle(bundle), tasks):
        assert (task.label, task.kind, task.num_fewshot, task.baseline) == (label, kind, shots, baseline)
        prepared = PreparedCore.build(task, read_items(task), tokenizer, CONTEXT)
        n_cut += sum(len(r.branches) == 1 for r in prepared.icl.rows if kind != "language_modeling")
        n_whole += sum(len(r.branches) > 1 for r in prepared.icl.rows)
        metrics, mine = score_core_task(model, prepared, 3, "cpu")
        theirs = reference_task(*hf_model, kind, records, shots, d, CONTEXT)
        assert [right for right, _ in mine] == [right for right, _ in theirs]
        for (_, a), (_, b) in zip(mine, theirs):
            assert a == pytest.approx(b, abs=1e-4)
        accuracy = sum(right for right, _ in theirs) / len(theirs)
        assert metrics["accuracy"] == accuracy and metrics["n"] == len(records)
        scores[label] = metrics
    assert n_cut and n_whole  # both paths: options sharing one row, and options cut from the left on their own
    assert any(right for right, _ in mine)  # the language-modelling item the model reproduces
    acc = {label: s["accuracy"] for label, s in scores.items()}
    by_hand = ((acc["mc_task"] - 0.25) / 0.75 + (acc["schema_task"] - 0.5) / 0.5 + acc["lm_task"]
               + acc["lm_zeroshot"]) / 4
    assert core_score(scores) == pytest.approx(by_hand, abs=1e-12)


def test_eval_suite_core_prints_tasks_and_json_last_line(hf_dir, hf_model, tasks, tmp_path, capsys):  # noqa: F811
    bundle = write_bundle(tmp_path, tasks)
    code, out, err = run(["eval", str(hf_dir), "--suite", "core", str(bundle), "--batch-size", "4"], capsys)
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"core", "tasks"} and set(last["tasks"]) == {t[0] for t in TASKS}
    accuracies = {}
    for label, kind, _, shots, d, _, records in tasks:
        theirs = reference_task(*hf_model, kind, records, shots, d, CONTEXT)
        accuracies[label] = sum(right for right, _ in theirs) / len(theirs)
        assert last["tasks"][label]["accuracy"] == accuracies[label]
        assert f"{label} accuracy {accuracies[label]:.4f}" in out
    by_hand = ((accuracies["mc_task"] - 0.25) / 0.75 + (accuracies["schema_task"] - 0.5) / 0.5
               + accuracies["lm_task"] + accuracies["lm_zeroshot"]) / 4
    assert last["core"] == pytest.approx(by_hand, abs=1e-12)
    assert last["tasks"]["schema_task"]["centered"] == pytest.approx((accuracies["schema_task"] - 0.5) / 0.5)
    assert f"CORE {by_hand:.4f}" in out
    code, out, _ = run(["eval", str(hf_dir), "--suite", "core", str(bundle), "--limit", "3"], capsys)
    assert code == 0 and '"core"' in out.splitlines()[-1] and "(n 3," in out


def test_batch_size_does_not_change_the_items(hf_dir, tmp_path):  # noqa: F811
    model, tokenizer, _ = load_for_text(hf_dir)
    for task in read_bundle(write_bundle(tmp_path)):
        prepared = PreparedCore.build(task, read_items(task), tokenizer, CONTEXT)
        one, many = (score_core_task(model, prepared, b, "cpu")[1] for b in (1, 16))
        assert [r for r, _ in one] == [r for r, _ in many]
        for (_, a), (_, b) in zip(one, many):
            assert a == pytest.approx(b, abs=1e-5)


# ----------------------------------------------------------------------------- bad bundles


def _yaml_edit(old, new):
    def edit(root):
        path = root / "core.yaml"
        path.write_text(path.read_text().replace(old, new, 1))
    return edit


BAD = [
    ("no core.yaml", lambda root: (root / "core.yaml").unlink(), "core.yaml: no such file; --suite core expects"),
    ("no csv", lambda root: (root / "eval_meta_data.csv").unlink(), "eval_meta_data.csv: no such file"),
    ("no data", lambda root: (root / "eval_data" / "mc.jsonl").unlink(),
     "mc.jsonl: no such file (the dataset_uri of mc_task in core.yaml)"),
    ("kind", _yaml_edit("icl_task_type: schema", "icl_task_type: generation_task_with_answers"),
     "icl_tasks[1] (schema_task): unknown icl_task_type 'generation_task_with_answers'; choose from multiple_choice"),
    ("shots", _yaml_edit("num_fewshot: [1]", "num_fewshot: [many]"), "num_fewshot must be a list of counts"),
    ("too many shots", _yaml_edit("num_fewshot: [1]", "num_fewshot: [10]"), "mc.jsonl: 10-shot needs more than 10"),
    ("baseline", lambda root: (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_task,25\n"),
     "eval_meta_data.csv: no row for 'schema_task'"),
    ("record", lambda root: (root / "eval_data" / "lm.jsonl").write_text('{"context": "a"}\n'),
     "lm.jsonl:1: no field 'continuation'"),
    ("gold", lambda root: (root / "eval_data" / "mc.jsonl").write_text(
        '{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"], "gold": 2}\n'),
     "mc.jsonl:2: field 'gold' must be the index of an option, 0 to 1, got 2"),
    ("yaml", lambda root: (root / "core.yaml").write_text("icl_tasks: [unclosed\n"), "core.yaml: not YAML"),
]


@pytest.mark.parametrize("name, damage, message", BAD, ids=[b[0] for b in BAD])
def test_bad_bundle_is_one_line(hf_dir, tmp_path, capsys, name, damage, message):  # noqa: F811
    bundle = write_bundle(tmp_path)
    damage(bundle)
    if name == "too many shots":
        model, tokenizer, _ = load_for_text(hf_dir)
        task = read_bundle(bundle)[0]
        with pytest.raises(DataError, match=message):
            PreparedCore.build(task, read_items(task), tokenizer, CONTEXT)
    code, out, err = run(["eval", str(hf_dir), "--suite", "core", str(bundle)], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def test_suite_takes_one_directory(hf_dir, tmp_path, capsys):  # noqa: F811
    code, _, err = run(["eval", str(hf_dir), "--suite", "core"], capsys)
    assert code == 1 and "--suite core takes one DATA, the eval bundle directory" in err
    code, _, err = run(["eval", str(hf_dir), "--suite", "core", str(tmp_path / "nope")], capsys)
    assert code == 1 and "nope: no such directory; --suite core expects the DCLM eval bundle" in err


def test_eval_suite_during_training_logs_core_and_matches_eval(text_file, tmp_path, capsys):
    bundle = write_bundle(tmp_path / "bundle")
    out = tmp_path / "run"
    code, stdout, err = run(["train", str(text_file), "--out", str(out), "--context-length", "32", "--emb-dim", "32",
                             "--n-heads", "2", "--n-layers", "2", "--max-steps", "4", "--eval-every", "2",
                             "--eval-batches", "1", "--sample-tokens", "0", "--batch-size", "2", "--no-progress",
                             "--device", "cpu", "--eval-suite", f"core={bundle}", "--eval-task-limit", "4"], capsys)
    assert code == 0, err
    evals = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    labels = [t[0] for t in TASKS]
    for r in evals:
        assert r["core"] == pytest.approx(sum(r[f"task/core/{label}"] for label in labels) / len(labels))
    assert "  core " in stdout and (out / "tasks.png").stat().st_size > 0
    code, text, err = run(["eval", str(out), "--checkpoint", "latest", "--suite", "core", str(bundle), "--limit", "4",
                           "--device", "cpu"], capsys)
    assert code == 0, err
    last = json.loads(text.strip().splitlines()[-1])
    assert last["core"] == pytest.approx(evals[-1]["core"], abs=1e-9)  # the same numbers as `gptforge eval`
    assert {k: v["centered"] for k, v in last["tasks"].items()} == pytest.approx(
        {label: evals[-1][f"task/core/{label}"] for label in labels}, abs=1e-9)
    code, _, err = run(["train", str(text_file), "--out", str(tmp_path / "r2"), "--eval-suite", "mmlu=x"], capsys)
    assert code == 1 and "--eval-suite 'mmlu=x' must be core=DIR" in err

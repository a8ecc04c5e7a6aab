"""SQuAD and CoQA as language modelling: their published JSON files read into lm-evaluation-harness's prompts
(squadv2's doc_to_text / doc_to_target called on the Hugging Face layout of the same questions; CoQA's prompt
written here as the harness's coqa utils build it, whose module no longer imports under transformers 5), each
target scored as the harness's HFLM.loglikelihood scores it: log-likelihoods within 1e-4, the same greedy
verdicts, acc and perplexity."""

from __future__ import annotations

import json
import math
import re
from itertools import zip_longest

import pytest
from test_fewshot import LONG, long_hf  # noqa: F401
from test_tasks import assert_same_lls

from gptforge.data import DataError
from gptforge.evaluate.tasks import PreparedTask, read_task, score_task
from gptforge.weights import load_for_text

SQUAD = {"version": "v2.0", "data": [
    {"title": "Normans", "paragraphs": [
        {"context": "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a "
                    "region in France.", "qas": [
            {"question": "In what country is Normandy located?", "id": "a1", "is_impossible": False,
             "answers": [{"text": "France", "answer_start": 96}, {"text": "France", "answer_start": 96}]},
            {"question": "Who gave their name to Normandy in the 1000's and 1100's", "id": "a2",
             "is_impossible": True, "answers": [], "plausible_answers": [{"text": "Normans", "answer_start": 4}]}]},
        {"context": "Rollo was a Viking leader.", "qas": [
            {"question": "Who was Rollo?", "id": "a3", "is_impossible": False,
             "answers": [{"text": "a Viking leader", "answer_start": 10}]}]}]},
    {"title": "Oxygen", "paragraphs": [
        {"context": "Oxygen is a chemical element with symbol O and atomic number 8.", "qas": [
            {"question": "What is the atomic number of oxygen?", "id": "b1", "is_impossible": False,
             "answers": [{"text": "8", "answer_start": 62}]}]}]},
]}
COQA = {"version": "1.0", "data": [
    {"source": "wikipedia", "id": "s1", "filename": "x.txt",
     "story": "Once upon a time, in a barn near a farm house, there lived a little white kitten named Cotton.",
     "questions": [{"input_text": "what color was cotton?", "turn_id": 1},
                   {"input_text": "where did she live?", "turn_id": 2},
                   {"input_text": "did she live alone?", "turn_id": 3}],
     "answers": [{"span_start": 59, "span_end": 93, "span_text": "a little white kitten named Cotton",
                  "input_text": "white", "turn_id": 1},
                 {"span_start": 18, "span_end": 80, "span_text": "in a barn near", "input_text": "in a barn",
                  "turn_id": 2},
                 {"span_start": 0, "span_end": 0, "span_text": "", "input_text": "no", "turn_id": 3}]},
    {"source": "cnn", "id": "s2", "filename": "y.txt", "story": "The rain fell all day in Paris.",
     "questions": [{"input_text": "Where did it rain?", "turn_id": 1}],
     "answers": [{"span_start": 0, "span_end": 0, "span_text": "", "input_text": "Paris", "turn_id": 1}]},
]}


def harness_squad_pairs() -> list[tuple[str, str]]:
    from lm_eval.tasks.squadv2.task import SQuAD2

    docs = [{"id": qa["id"], "title": a["title"], "context": p["context"], "question": qa["question"],
             "answers": {"text": [x["text"] for x in qa["answers"]],
                         "answer_start": [x["answer_start"] for x in qa["answers"]]}}
            for a in SQUAD["data"] for p in a["paragraphs"] for qa in p["qas"]]
    return [(SQuAD2.doc_to_text(None, d), SQuAD2.doc_to_target(None, d)) for d in docs]


def harness_coqa_pairs() -> list[tuple[str, str]]:
    """lm-evaluation-harness's coqa doc_to_text / doc_to_target (its first answer) on each story, written out."""
    pairs = []
    for story in COQA["data"]:
        questions = [q["input_text"] for q in story["questions"]]
        answers = [a["input_text"] for a in story["answers"]]
        text = story["story"] + "\n\n"
        for q, a in zip_longest(questions, answers[:-1]):
            text += f"Q: {q}\n\n" + (f"A: {a}\n\n" if a is not None else "A:")
        pairs.append((text, " " + answers[len(questions) - 1]))  # the target after the harness's " " delimiter
    return pairs


@pytest.mark.parametrize("task, doc, reference", [("squad", SQUAD, harness_squad_pairs),
                                                  ("coqa", COQA, harness_coqa_pairs)])
def test_scored_as_the_harness_scores_the_same_requests(long_hf, tmp_path, task, doc, reference):  # noqa: F811
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path = tmp_path / f"{task}.json"
    path.write_text(json.dumps(doc))
    items = read_task(task, path)
    pairs = reference()
    assert [it.pairs()[0] for it in items] == pairs
    lm = HFLM(pretrained=str(long_hf), device="cpu", batch_size=2)
    theirs = [[r] for r in lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)]
    model, tokenizer, _ = load_for_text(long_hf)
    metrics, mine = score_task(model, PreparedTask.build(task, items, tokenizer, LONG), 2, "cpu")
    assert_same_lls(mine, theirs)
    assert metrics["acc"] == sum(r[0][1] for r in theirs) / len(theirs)
    assert metrics["perplexity"] == pytest.approx(math.exp(-sum(r[0][0] for r in theirs) / len(theirs)), rel=1e-6)
    assert read_task(task, path, limit=1) == items[:1]


@pytest.mark.parametrize("task, text, message", [
    ("squad", "not json", "not JSON"),
    ("squad", '{"data": [{"title": "t", "paragraphs": [{"qas": [{"question": "q", "answers": []}]}]}]}',
     "data[0].paragraphs[0]: no field 'context'"),
    ("coqa", '{"data": [{"story": "s", "questions": [{"input_text": "q"}], "answers": []}]}',
     "data[0]: needs as many answers as questions"),
    ("coqa", '{"data": []}', "no records"),
])
def test_malformed_files_name_the_place(tmp_path, task, text, message):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        read_task(task, path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)

"""The records of each downstream task's published file, read into `Item`s with the harness's prompts.

Each reader takes one JSON record (and where it is, file:line, for errors) and builds the prompt of
lm-evaluation-harness 0.4's task YAML and utils for it (lm_eval/tasks/<task>/): the context, the choices and the
gold index. Three kinds of item: multiple choice (choices after one context), cloze (one target after the context:
LAMBADA, our own `continuation`) and schema (one continuation after each candidate context: Winograd-style).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import DataError


def json_lines(path, expects: str = ""):
    """(record, "file:line") for each non-blank line of a JSON Lines file, in order; a line that is not a JSON object
    is a DataError naming the file and line (and, after a "; ", what the file should hold: `expects`)."""
    tail = f"; {expects}" if expects else ""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not a JSON record ({e}){tail}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: not a JSON object{tail}")
            yield record, where


@dataclass
class Item:
    context: str  # schema: what comes before each candidate context (few-shot examples), usually ""
    choices: list[str]  # multiple choice: the choices' text; cloze and schema: the one continuation
    label: int  # the gold choice (cloze: 0; schema: the gold context)
    delimiter: str = " "  # between the context and each choice (the harness's target_delimiter)
    cloze: bool = False
    contexts: list[str] | None = None  # schema: the candidate contexts, each followed by the continuation
    group: str | None = None  # the subject an item belongs to (C-Eval, CMMLU): scored per subject too

    @property
    def kind(self) -> str:
        return "schema" if self.contexts is not None else "cloze" if self.cloze else "multiple-choice"

    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]

    def pairs(self) -> list[tuple[str, str]]:
        """The (context, continuation) requests the item is scored by, one per choice (schema: per context)."""
        if self.contexts is not None:
            return [(self.context + c, self.delimiter + self.choices[0]) for c in self.contexts]
        return [(self.context, c) for c in self.continuations()]

    def example(self) -> str:
        """The item as a few-shot example: its context (schema: the gold one), the delimiter, its answer."""
        if self.contexts is not None:
            return f"{self.context}{self.contexts[self.label]}{self.delimiter}{self.choices[0]}"
        return f"{self.context}{self.delimiter}{self.choices[self.label]}"


def _field(record: dict, key: str, where: str, kind: type | tuple = str):
    """record[key] (a dotted key reaches inside), checked to be of `kind`; else a DataError naming where and key."""
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: no field {key!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be a {names}, got {type(value).__name__}")
    return value


def _label(value, n: int, where: str, key: str = "label") -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise DataError(f"{where}: field {key!r} must be the index of a choice, 0 to {n - 1}, got {value!r}")
    return value


def _strings(record: dict, key: str, where: str) -> list[str]:
    values = _field(record, key, where, list)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: field {key!r} must be a list of at least 2 strings")
    return values


# ----------------------------------------------------------------------------- the tasks' records


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up: WikiHow's [title] and other bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(record: dict, where: str) -> Item:
    ctx = _field(record, "ctx_a", where) + " " + _field(record, "ctx_b", where).capitalize()
    endings = _strings(record, "endings", where)
    if "label" not in record:
        raise DataError(f"{where}: no field 'label' (HellaSwag's test split has none: use hellaswag_val.jsonl)")
    return Item(hellaswag_preprocess(_field(record, "activity_label", where) + ": " + ctx),
                [hellaswag_preprocess(e) for e in endings], _label(record["label"], len(endings), where))


def lambada_item(record: dict, where: str) -> Item:
    words = _field(record, "text", where).split(" ")
    if len(words) < 2:
        raise DataError(f"{where}: field 'text' must have at least two words (the last one is predicted)")
    return Item(" ".join(words[:-1]), [words[-1]], 0, cloze=True)


def arc_item(record: dict, where: str) -> Item:
    choices = _field(record, "question.choices", where, list)
    if len(choices) < 2 or not all(isinstance(c, dict) for c in choices):
        raise DataError(f"{where}: field 'question.choices' must be a list of at least 2 {{label, text}} objects")
    labels = [_field(c, "label", f"{where}: question.choices[{k}]") for k, c in enumerate(choices)]
    texts = [_field(c, "text", f"{where}: question.choices[{k}]") for k, c in enumerate(choices)]
    key = _field(record, "answerKey", where)
    if key not in labels:
        raise DataError(f"{where}: field 'answerKey' {key!r} is none of the choices' labels {labels}")
    return Item("Question: " + _field(record, "question.stem", where) + "\nAnswer:", texts, labels.index(key))


def piqa_item(record: dict, where: str) -> Item:
    choices = [_field(record, "sol1", where), _field(record, "sol2", where)]
    if "label" not in record:
        raise DataError(f"{where}: no field 'label' and no labels file (valid-labels.lst beside valid.jsonl)")
    return Item("Question: " + _field(record, "goal", where) + "\nAnswer:", choices,
                _label(record["label"], 2, where))


def choice_item(record: dict, where: str) -> Item:
    """Our own format: {"context", "choices", "label"} (multiple choice), {"context", "continuation"} (cloze) or
    {"contexts", "continuation", "label"} (schema), with an optional "delimiter" (default " ") put between the
    context and each choice (schema: each context and the continuation)."""
    delimiter = _field(record, "delimiter", where) if "delimiter" in record else " "
    if "contexts" in record:
        contexts = _strings(record, "contexts", where)
        if "label" not in record:
            raise DataError(f"{where}: no field 'label' (the index of the right context)")
        return Item("", [_field(record, "continuation", where)], _label(record["label"], len(contexts), where),
                    delimiter, contexts=contexts)
    context = _field(record, "context", where)
    if "continuation" in record:
        return Item(context, [_field(record, "continuation", where)], 0, delimiter, cloze=True)
    if "choices" not in record:
        raise DataError(f"{where}: no field 'choices' (multiple choice), 'continuation' (cloze) or 'contexts' "
                        "(schema)")
    choices = _strings(record, "choices", where)
    if not all(choices):
        raise DataError(f"{where}: field 'choices' holds an empty choice")
    if "label" not in record:
        raise DataError(f"{where}: no field 'label' (the index of the right choice)")
    return Item(context, choices, _label(record["label"], len(choices), where), delimiter)


def _choice_list(record: dict, key: str, where: str) -> tuple[list[str], list[str]]:
    """The labels and texts of a `[{label, text}, ...]` list (ARC's, OpenBookQA's and CommonsenseQA's layout)."""
    choices = _field(record, key, where, list)
    if len(choices) < 2 or not all(isinstance(c, dict) for c in choices):
        raise DataError(f"{where}: field {key!r} must be a list of at least 2 {{label, text}} objects")
    return ([_field(c, "label", f"{where}: {key}[{k}]") for k, c in enumerate(choices)],
            [_field(c, "text", f"{where}: {key}[{k}]") for k, c in enumerate(choices)])


def _answer_key(record: dict, labels: list[str], where: str) -> int:
    key = _field(record, "answerKey", where).lstrip()
    if key not in labels:
        raise DataError(f"{where}: field 'answerKey' {key!r} is none of the choices' labels {labels}")
    return labels.index(key)


def winogrande_item(record: dict, where: str) -> Item:
    """WinoGrande (dev.jsonl: sentence with a "_", option1, option2, answer "1"/"2"): schema, each option put in
    for the blank, the rest of the sentence the continuation (the harness's partial evaluation)."""
    sentence = _field(record, "sentence", where)
    if "_" not in sentence:
        raise DataError(f"{where}: field 'sentence' has no '_' (the blank the options fill)")
    blank = sentence.index("_")
    options = [_field(record, "option1", where), _field(record, "option2", where)]
    if "answer" not in record:
        raise DataError(f"{where}: no field 'answer' (WinoGrande's test split has none: use dev.jsonl)")
    label = _label(record["answer"], 3, where, "answer") - 1
    if label < 0:
        raise DataError(f"{where}: field 'answer' must be 1 or 2, got {record['answer']!r}")
    return Item("", [sentence[blank + 1:].strip()], label, contexts=[sentence[:blank] + o for o in options])


UPPER_PRONOUNS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


def wsc273_option(text: str, pronoun: str, at: int, option: str) -> str:
    """The harness's WSC273 clean-up of an option: 's after a possessive pronoun, a leading pronoun-like word
    lower-cased unless the pronoun starts a sentence."""
    if pronoun.lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    first = option.split()[0]
    if text[at - 2] != "." and first in UPPER_PRONOUNS:
        return option.replace(first, first.lower())
    return option


def wsc273_item(record: dict, where: str) -> Item:
    """WSC273 (Winograd, the layout of the Hugging Face winograd_wsc wsc273 split: text, pronoun, pronoun_loc,
    options, label): schema, each option put in for the pronoun, the text after it the continuation."""
    text = _field(record, "text", where).replace("  ", " ")
    pronoun, at = _field(record, "pronoun", where), _field(record, "pronoun_loc", where, int)
    options = _strings(record, "options", where)
    if len(options) != 2 or not 0 <= at <= len(text):
        raise DataError(f"{where}: needs 2 'options' and a 'pronoun_loc' inside 'text'")
    options = [wsc273_option(text, pronoun, at, o) for o in options]
    return Item("", [text[at + len(pronoun):]], _label(record.get("label"), 2, where),
                contexts=[text[:at] + o for o in options])


def copa_item(record: dict, where: str) -> Item:
    """COPA (SuperGLUE's val.jsonl: premise, choice1, choice2, question cause/effect, label)."""
    question = _field(record, "question", where)
    if question not in ("cause", "effect"):
        raise DataError(f"{where}: field 'question' must be 'cause' or 'effect', got {question!r}")
    connector = {"cause": "because", "effect": "therefore"}[question]
    choices = [_field(record, "choice1", where), _field(record, "choice2", where)]
    return Item(_field(record, "premise", where).strip()[:-1] + f" {connector}",
                [" " + c[:1].lower() + c[1:] for c in choices], _label(record.get("label"), 2, where))


def boolq_item(record: dict, where: str) -> Item:
    """BoolQ (SuperGLUE's val.jsonl: passage, question, label 0/1 or true/false; BoolQ's own dev.jsonl: answer)."""
    key = "label" if "label" in record else "answer"
    if key not in record:
        raise DataError(f"{where}: no field 'label' (or 'answer')")
    value = record[key]
    label = int(value) if isinstance(value, bool) else _label(value, 2, where, key)
    return Item(f"{_field(record, 'passage', where)}\nQuestion: {_field(record, 'question', where)}?\nAnswer:",
                ["no", "yes"], label)


def openbookqa_item(record: dict, where: str) -> Item:
    """OpenBookQA (Data/Main/test.jsonl: question.stem, question.choices[].{label,text}, answerKey)."""
    labels, texts = _choice_list(record, "question.choices", where)
    return Item(_field(record, "question.stem", where), texts, _answer_key(record, labels, where))


def commonsenseqa_item(record: dict, where: str) -> Item:
    """CommonsenseQA (dev_rand_split.jsonl: question.stem, question.choices[].{label,text} A-E, answerKey): the
    choices listed in the prompt, the letters scored."""
    labels, texts = _choice_list(record, "question.choices", where)
    if len(texts) != 5:
        raise DataError(f"{where}: field 'question.choices' must hold 5 choices (A to E), got {len(texts)}")
    listed = "".join(f"\n{letter}. {t}" for letter, t in zip("ABCDE", texts))
    letters = list("ABCDE")
    key = _field(record, "answerKey", where)
    if key not in letters:
        raise DataError(f"{where}: field 'answerKey' must be one of A to E, got {key!r}")
    return Item(f"Question: {_field(record, 'question.stem', where).strip()}{listed}\nAnswer:", letters,
                letters.index(key))


def siqa_item(record: dict, where: str) -> Item:
    """Social IQa (dev.jsonl: context, question, answerA-C, with dev-labels.lst beside it (1-3) or a label)."""
    choices = [_field(record, f"answer{c}", where) for c in "ABC"]
    if "label" not in record:
        raise DataError(f"{where}: no field 'label' and no labels file (dev-labels.lst beside dev.jsonl)")
    label = _label(record["label"], 4, where) - 1
    if label < 0:
        raise DataError(f"{where}: field 'label' must be 1, 2 or 3, got {record['label']!r}")
    return Item(f"Q: {_field(record, 'context', where)} {_field(record, 'question', where)}\nA:", choices, label)


def _list(value, where: str, what: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a list")
    return value


def squad_records(doc, path: str) -> list[tuple[dict, str]]:
    """SQuAD's dev-v2.0.json (or dev-v1.1.json): data[].paragraphs[].qas[] -> one record per question, in the
    Hugging Face squad_v2 layout's fields (title, context, question, answers)."""
    out = []
    for a, article in enumerate(_list(doc.get("data") if isinstance(doc, dict) else None, path, "field 'data'")):
        where = f"{path}: data[{a}]"
        for p, para in enumerate(_list(_field(article, "paragraphs", where, list), where, "paragraphs")):
            at = f"{where}.paragraphs[{p}]"
            for q, qa in enumerate(_field(para, "qas", at, list)):
                answers = [_field(x, "text", f"{at}.qas[{q}].answers") for x in _field(qa, "answers", at, list)]
                out.append(({"title": _field(article, "title", where), "context": _field(para, "context", at),
                             "question": _field(qa, "question", f"{at}.qas[{q}]"), "answers": answers},
                            f"{at}.qas[{q}]"))
    return out


def squad_item(record: dict, where: str) -> Item:
    """SQuAD as language modelling, with lm-evaluation-harness's squadv2 prompt (Title, Background, Question,
    Answer:) and target (the first answer, or "unanswerable"): right when greedy decoding gives the answer."""
    answers = record["answers"]
    return Item(f"Title: {record['title']}\n\nBackground: {record['context']}\n\nQuestion: {record['question']}"
                "\n\nAnswer:", [answers[0] if answers else "unanswerable"], 0, cloze=True)


def coqa_records(doc, path: str) -> list[tuple[dict, str]]:
    """CoQA's coqa-dev-v1.0.json: data[] -> one record per story (its questions and answers in order)."""
    out = []
    for s, story in enumerate(_list(doc.get("data") if isinstance(doc, dict) else None, path, "field 'data'")):
        where = f"{path}: data[{s}]"
        questions = [_field(q, "input_text", f"{where}.questions") for q in _field(story, "questions", where, list)]
        answers = [_field(a, "input_text", f"{where}.answers") for a in _field(story, "answers", where, list)]
        if not questions or len(answers) != len(questions):
            raise DataError(f"{where}: needs as many answers as questions, and at least one")
        out.append(({"story": _field(story, "story", where), "questions": questions, "answers": answers}, where))
    return out


def coqa_item(record: dict, where: str) -> Item:
    """CoQA as language modelling, with lm-evaluation-harness's coqa prompt (the story, then each earlier turn
    as "Q: …\\n\\nA: …", the last question and "A:"); the target is the last turn's answer."""
    turns = "".join(f"Q: {q}\n\nA: {a}\n\n" for q, a in zip(record["questions"], record["answers"][:-1]))
    return Item(f"{record['story']}\n\n{turns}Q: {record['questions'][-1]}\n\nA:", [record["answers"][-1]], 0,
                cloze=True)

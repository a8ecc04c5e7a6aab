"""In-context-learning items scored as DCLM defines them and nanochat's evaluator (core_eval.py) computes them.

Three kinds, each item a JSON record:
- multiple choice (`query`, `choices`, `gold`): one prompt per choice, query + delimiter + choice; the choice
  with the lowest mean loss over its tokens (those after the prompts' common prefix) is the answer;
- schema (`context_options`, `continuation`, `gold`): one prompt per context option, option + delimiter +
  continuation; the lowest mean loss over the prompts' common suffix is the answer (Winograd-style);
- language modelling (`context`, `continuation`): right when greedy decoding reproduces every continuation
  token after the prompt without it (the context stripped, + delimiter, stripped again).
Few-shot examples of item i: `random.Random(1234 + i).sample(the other items, k)`, each rendered as the item is
but with its gold answer, then a blank line, before the item. Every prompt is tokenized with the BOS token
prepended and, when longer than the model's context, cut from the left.

A cost nanochat does not pay attention to: the prompts of an item share their few-shot examples and their
beginning, so when none is cut they become one `Row` (loglikelihood.py): the common prefix once, each prompt's
rest a branch seeing it, a schema option's own tokens before the shared suffix inputs that are not scored.
Rows of many items share a batch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ConfigError
from ..errors import DataError
from ..tokenizer import Tokenizer
from .loglikelihood import Row, common_length

KINDS = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": "query, choices, gold", "schema": "context_options, continuation, gold",
          "language_modeling": "context, continuation"}
FEWSHOT_SEED = 1234  # item i's examples: random.Random(FEWSHOT_SEED + i)


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: no field {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _texts(record: dict, key: str, where: str) -> list[str]:
    values = record.get(key)
    if not isinstance(values, list) or len(values) < 2:
        raise DataError(f"{where}: field {key!r} must be a list of at least 2 strings")
    return [_text({key: v}, key, where) for v in values]


def _gold(record: dict, n: int, where: str) -> int:
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise DataError(f"{where}: field 'gold' must be the index of an option, 0 to {n - 1}, got {gold!r}")
    return gold


def check_record(kind: str, record, where: str) -> dict:
    """The record's fields as strings (and `gold` an index), checked for its kind; a DataError naming where."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object; a {kind} item has {FIELDS[kind]}")
    if kind == "multiple_choice":
        choices = _texts(record, "choices", where)
        return {"query": _text(record, "query", where), "choices": choices, "gold": _gold(record, len(choices), where)}
    if kind == "schema":
        options = _texts(record, "context_options", where)
        return {"context_options": options, "continuation": _text(record, "continuation", where),
                "gold": _gold(record, len(options), where)}
    return {"context": _text(record, "context", where), "continuation": _text(record, "continuation", where)}


def render(kind: str, item: dict, delimiter: str, examples: Sequence[dict]) -> list[str]:
    """The prompts of an item: one per choice or context option; language modelling: (without, with) the
    continuation."""
    if kind == "multiple_choice":
        shots = "".join(f"{e['query']}{delimiter}{e['choices'][e['gold']]}\n\n" for e in examples)
        return [f"{shots}{item['query']}{delimiter}{c}" for c in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{e['context_options'][e['gold']]}{delimiter}{e['continuation']}\n\n" for e in examples)
        return [f"{shots}{c}{delimiter}{item['continuation']}" for c in item["context_options"]]
    shots = "".join(f"{e['context'].strip()}{delimiter}{e['continuation']}\n\n" for e in examples)
    without = f"{shots}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def bos_id(tokenizer: Tokenizer) -> int:
    """The token every prompt starts with: the tokenizer's BOS, else its end of text (GPT-2's BOS)."""
    bos = getattr(tokenizer, "bos_id", None)
    bos = tokenizer.eot_id if bos is None else bos
    if bos is None:
        raise ConfigError(f"tokenizer {tokenizer.name} has no BOS or end-of-text token to begin each prompt with")
    return bos


def encode(kind: str, prompts: Sequence[str], tokenizer: Tokenizer, bos: int,
           where: str) -> tuple[list[list[int]], list[int]]:
    """The token sequences an item is scored on and where each one's scored tokens start (they run to its end)."""
    tokens = [[bos] + tokenizer.encode(p) for p in prompts]
    if kind == "multiple_choice":
        return tokens, [common_length(tokens)] * len(tokens)
    if kind == "schema":
        suffix = common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens]
    without, whole = tokens
    if len(without) >= len(whole) or whole[:len(without)] != without:
        raise DataError(f"{where}: the prompt without the continuation does not tokenize as the start of the "
                        "prompt with it, so the continuation's tokens cannot be told apart")
    return [whole], [len(without)]


def cut(tokens: list[list[int]], starts: list[int], max_length: int,
        where: str) -> tuple[list[list[int]], list[int], bool]:
    """Each sequence longer than max_length cut from the left (its start moving with it); whether any was."""
    out, out_starts = [], []
    for t, s in zip(tokens, starts):
        over = max(0, len(t) - max_length)
        t, s = t[over:], s - over
        if s < 1:
            raise ConfigError(f"{where}: the scored tokens ({len(t) - s}) leave no context within the model's "
                              f"{max_length} positions")
        if s >= len(t):
            raise DataError(f"{where}: the options share no tokens to score (one option's tokens are all of "
                            "another's start or end)")
        out.append(t)
        out_starts.append(s)
    return out, out_starts, any(len(t) > max_length for t in tokens)


def item_rows(i: int, tokens: list[list[int]], starts: list[int], was_cut: bool) -> list[Row]:
    """The rows of item i: one holding every option after their common prefix, or, when a sequence was cut (its
    positions moved), one per option."""
    if was_cut:
        return [Row(t[:s], [t[s:]], [(i, j)]) for j, (t, s) in enumerate(zip(tokens, starts))]
    shared = min(common_length(tokens), *starts)
    return [Row(tokens[0][:shared], [t[shared:] for t in tokens], [(i, j) for j in range(len(tokens))],
                [s - shared for s in starts])]


@dataclass
class IclTask:
    """A task's items encoded for a tokenizer and a context length: the rows to score and, per item, each
    option's number of scored tokens."""

    kind: str
    items: list[dict]
    rows: list[Row]
    counts: list[list[int]]

    @classmethod
    def build(cls, kind: str, items: Sequence[dict], wheres: Sequence[str], delimiter: str, num_fewshot: int,
              tokenizer: Tokenizer, max_length: int) -> IclTask:
        if num_fewshot > len(items) - 1:
            raise DataError(f"{wheres[0].rpartition(':')[0]}: {num_fewshot}-shot needs more than {num_fewshot} "
                            f"items, the file has {len(items)}")
        bos, rows, counts = bos_id(tokenizer), [], []
        for i, (item, where) in enumerate(zip(items, wheres)):
            examples = []
            if num_fewshot:
                others = [j for j in range(len(items)) if j != i]
                examples = [items[j] for j in random.Random(FEWSHOT_SEED + i).sample(others, num_fewshot)]
            tokens, starts = encode(kind, render(kind, item, delimiter, examples), tokenizer, bos, where)
            tokens, starts, was_cut = cut(tokens, starts, max_length, where)
            rows += item_rows(i, tokens, starts, was_cut)
            counts.append([len(t) - s for t, s in zip(tokens, starts)])
        return cls(kind, list(items), rows, counts)

    def judge(self, results: Sequence[Sequence[tuple[float, bool]]]) -> list[tuple[bool, list[float]]]:
        """Per item: right or not, and each option's mean loss (language modelling: the continuation's)."""
        out = []
        for item, scores, counts in zip(self.items, results, self.counts):
            losses = [-ll / n for (ll, _), n in zip(scores, counts)]
            if self.kind == "language_modeling":
                out.append((scores[0][1], losses))
            else:
                out.append((losses.index(min(losses)) == item["gold"], losses))
        return out

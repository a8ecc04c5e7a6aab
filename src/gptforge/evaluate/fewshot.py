"""Few-shot contexts built as lm-evaluation-harness 0.4 builds them (`ConfigurableTask.fewshot_context` with its
default `ContextSampler`).

The examples come from the task's few-shot pool: its train split when the task has one (HellaSwag, ARC, PIQA:
the user's train file), else the evaluated file itself (LAMBADA: the whole test file, the item itself among the
candidates, as the harness draws them; our `choice` format: the other items). One `random.Random(1234)` per task
(the harness's default fewshot seed) draws each item's examples in file order: `sample(pool, n)`, or, for tasks
whose config makes the harness exclude the evaluated document (HellaSwag and PIQA, whose few-shot split "equals"
their absent test split; `choice`, whose documented config says `fewshot_split: test`), `sample(pool, n + 1)`
with the item removed, the first n kept. Each example is rendered as question + " " + answer + "\\n\\n"
(the harness's target and few-shot delimiters), the item's own context follows, and its choices are scored after
it as without examples.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from ..errors import DataError

SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed
FEWSHOT_DELIMITER = "\n\n"


def draw(rnd: random.Random, pool: Sequence, n: int, item, exclude: bool) -> list:
    """The harness's ContextSampler.sample: n examples; with exclude, n + 1 drawn and the item (every equal
    copy) removed, or, when that leaves fewer than n, n drawn again from the pool without it."""
    if not exclude:
        return rnd.sample(list(pool), n)
    picked = [x for x in rnd.sample(list(pool), n + 1) if x != item][:n]
    if len(picked) < n:
        picked = rnd.sample([x for x in pool if x != item], n)
    return picked


def example(item, task_name: str) -> str:
    """An item as a few-shot example: its context, the target delimiter, its gold answer. LAMBADA's answer is the
    harness's target, " " + the last word, so its examples hold two spaces before the word (as the harness's do)."""
    if task_name == "lambada":
        return f"{item.context} {item.delimiter}{item.choices[0]}"
    return item.example()


def with_fewshot(items: Sequence, pool: Sequence, n: int, task_name: str, exclude: bool,
                 where: str, seed: int = SEED) -> list:
    """The items with n examples each before their context (items unchanged when n is 0)."""
    if n == 0:
        return list(items)
    if n + exclude > len(pool):
        raise DataError(f"{where}: --num-fewshot {n} needs at least {n + exclude} examples to draw from, the "
                        f"few-shot pool has {len(pool)}")
    rnd = random.Random(seed)
    out = []
    for item in items:
        shots = draw(rnd, pool, n, item, exclude)
        context = "".join(example(x, task_name) + FEWSHOT_DELIMITER for x in shots)
        out.append(replace(item, context=context + item.context))
    return out

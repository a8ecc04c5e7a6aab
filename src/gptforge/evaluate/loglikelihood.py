"""Log-likelihoods of continuations given a context, computed as lm-evaluation-harness computes them.

The harness (0.4, `lm_eval.models.huggingface.HFLM.loglikelihood`) scores each (context, continuation)
pair on its own: trailing spaces of the context move to the continuation, the context is encoded
alone and the pair as one string, the continuation's tokens are the whole's after the context's,
an empty context becomes the prefix token (end of text), and the tokens are cut from the left to
the model's length + 1. It returns the summed log-probability of the continuation's tokens and
whether greedy decoding would produce them.

We compute the same numbers with fewer FLOPs. The continuations of one item share their context,
so a `Row` holds the context once and each continuation after it as a branch (when the contexts differ, as
a schema item's do, their common start once and each one's rest at the start of its branch): branch tokens sit at
the positions they would have after the context alone, and the attention mask lets them see the
context and their own branch only (a tree, passed to the model as a `layout`). The LM head runs
only where a token is scored. Pairs whose context the harness would cut differently get a row of
their own. Rows are sorted by length and batched, padded on the right.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..distributed import gather
from ..tokenizer import Tokenizer

HEAD_CHUNK = 1024  # scored positions per LM-head product: bounds the (N, vocab) logits in memory


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's tokens of one pair: (context ids, continuation ids)."""
    if context == "":  # the prefix token is the context (the harness's prefix_token_id: BOS, else EOS)
        cont = tokenizer.encode(continuation)
        prefix = getattr(tokenizer, "bos_id", None)
        prefix = tokenizer.eot_id if prefix is None else prefix
        if prefix is None:
            raise ConfigError(f"tokenizer {tokenizer.name} has no BOS or end-of-text token to stand for an empty "
                              "context")
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class Row:
    """One model input: a prefix and branches; branch j's tokens follow the prefix in the model's view.

    `pairs` says which request and continuation each branch scores; `skips` (default none) how many of each
    branch's first tokens are context rather than scored (a schema option's own words before the shared
    continuation).
    """

    prefix: list[int]
    branches: list[list[int]]
    pairs: list[tuple[int, int]]
    skips: list[int] | None = None

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(b) - 1 for b in self.branches)  # a branch's last token is not an input


def common_length(seqs: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """How many leading (from_end: trailing) tokens all of seqs share."""
    n = min(len(s) for s in seqs)
    for k in range(n):
        at = -1 - k if from_end else k
        if any(s[at] != seqs[0][at] for s in seqs):
            return k
    return n


def plan_rows(encoded: Sequence[Sequence[tuple[list[int], list[int]]]], max_length: int) -> list[Row]:
    """Rows for requests given as lists of encoded (context, continuation) pairs: one row per request whose pairs
    need no cutting, their contexts' common tokens once (a schema item's contexts differ after it: each one's
    rest is a branch's unscored start); otherwise one row per pair, cut as the harness cuts it."""
    rows = []
    for i, pairs in enumerate(encoded):
        for _, cont in pairs:
            if not cont:
                raise ConfigError("a continuation encodes to no tokens; every choice must have some text")
            if len(cont) > max_length:
                raise ConfigError(f"a continuation of {len(cont)} tokens is longer than the model's context length "
                                  f"{max_length}")
        shared = common_length([ctx for ctx, _ in pairs])
        if shared and all(len(ctx) + len(cont) <= max_length + 1 for ctx, cont in pairs):
            rows.append(Row(list(pairs[0][0][:shared]), [list(ctx[shared:]) + list(c) for ctx, c in pairs],
                            [(i, j) for j in range(len(pairs))], [len(ctx) - shared for ctx, _ in pairs]))
            continue
        for j, (ctx, cont) in enumerate(pairs):
            tokens = (list(ctx) + list(cont))[-(max_length + 1):]
            rows.append(Row(tokens[: len(tokens) - len(cont)], [list(cont)], [(i, j)]))
    return rows


def batch_tensors(rows: Sequence[Row], device) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                                                         torch.Tensor, torch.Tensor, list[list[int]]]:
    """The model input of rows, padded on the right: ids (B, T), layout (positions, mask), the flat index into
    (B * T) hidden states of each scored position, the token it scores (both (N,)), and, per row and branch,
    how many scored positions are the branch's (in order)."""
    T = max(r.length for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    branch = torch.full((len(rows), T), -1, dtype=torch.long)  # 0: the prefix, j + 1: branch j, -1: padding
    index, target, counts = [], [], []
    for b, row in enumerate(rows):
        p, skips = len(row.prefix), row.skips or [0] * len(row.branches)
        ids[b, :p] = torch.tensor(row.prefix)
        pos[b, :p] = torch.arange(p)
        branch[b, :p] = 0
        at, row_counts = p, []
        for j, tokens in enumerate(row.branches):
            n = len(tokens) - 1  # inputs: all but the last token
            ids[b, at:at + n] = torch.tensor(tokens[:-1], dtype=torch.long)
            pos[b, at:at + n] = torch.arange(p, p + n)
            branch[b, at:at + n] = j + 1
            # token 0 is scored from the prefix's last position, token k from the branch's (k-1)-th input
            index += [b * T + (p - 1 if k == 0 else at + k - 1) for k in range(skips[j], n + 1)]
            target += tokens[skips[j]:]
            at += n
            row_counts.append(len(tokens) - skips[j])
        counts.append(row_counts)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (branch[:, :, None] == branch[:, None, :]) | (branch[:, None, :] == 0)  # (B, T, T): query, key
    mask = (same & causal)[:, None]  # (B, 1, T, T); padding sees the prefix and padding: finite, never scored
    return (ids.to(device), (pos.to(device), mask.to(device)), torch.tensor(index, device=device),
            torch.tensor(target, device=device), counts)


def scored_tokens(index: torch.Tensor, h: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                  vocab_size: int) -> torch.Tensor:
    """The model's `loss` hook: for hidden states h (B, T, C), the log-probability of each target at the flat
    positions `index` and whether it is the arg-max token: (N, 2), in fp32."""
    h = h.flatten(0, 1)[index]  # (N, C)
    out = []
    for start in range(0, len(index), HEAD_CHUNK):
        logits = F.linear(h[start:start + HEAD_CHUNK], head_weight[:vocab_size]).float()  # (n, vocab)
        t = targets[start:start + HEAD_CHUNK]
        logp = logits.log_softmax(dim=-1).gather(1, t[:, None])[:, 0]
        out.append(torch.stack((logp, (logits.argmax(dim=-1) == t).float()), dim=1))
    return torch.cat(out)


@torch.no_grad()
def score_rows(model: torch.nn.Module, rows: Sequence[Row], n_requests: Sequence[int], batch_size: int,
               device, progress: Callable[[int], None] | None = None,
               ranks: tuple[int, int] = (0, 1)) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, greedy) of every continuation of every request: result[i][j] for request i's pair j
    (n_requests[i] pairs). Rows are scored longest first, batch_size at a time; progress(k) after k more rows.

    ranks (rank, world) under torchrun: each rank scores every W-th batch and the results are gathered, so
    every rank returns them all; every rank runs the same number of forwards (FSDP needs each one's part).
    Puts the model in eval mode (no dropout) and restores the mode it had.
    """
    rank, world = ranks
    results: list[list] = [[None] * n for n in n_requests]
    order = sorted(range(len(rows)), key=lambda k: -rows[k].length)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for b in range(rank, rank + world * -(-len(batches) // world), world):
            batch = [rows[k] for k in batches[b if b < len(batches) else 0]]
            ids, layout, index, target, counts = batch_tensors(batch, device)
            scores = model(ids, targets=target, loss=partial(scored_tokens, index), layout=layout).cpu()
            if b >= len(batches):
                continue  # a forward for the other ranks' sake: nothing of this rank's is left
            at = 0
            for row, row_counts in zip(batch, counts):
                for (i, j), n in zip(row.pairs, row_counts):
                    part = scores[at:at + n]
                    results[i][j] = (float(part[:, 0].sum()), bool(part[:, 1].all()))
                    at += n
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    if world > 1:
        every = gather(results)
        results = [[next(r[i][j] for r in every if r[i][j] is not None) for j in range(n)]
                   for i, n in enumerate(n_requests)]
    return results

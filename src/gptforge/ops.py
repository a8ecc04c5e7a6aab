"""Faster CPU versions of pieces of training (the LM head's cross-entropy, dropout) and of decoding.

The model uses them when it runs in fp32 on a CPU, eager (not under torch.compile or autocast);
everywhere else it uses the plain PyTorch ops. Decoding's pieces (`linear`, `decode_attention`,
`DecodeThreads`) are described where they are defined. The training pieces compute the same function
as the plain ops (tests check the loss and every gradient against `F.cross_entropy` and the dropout
statistics); they differ in how much memory they touch:

- `head_cross_entropy`: GPT-2's vocabulary of 50,257 gives a (tokens × 50,257) logits matrix whose
  odd row length slows MKL's matmul by ~30%, and the plain path then allocates and streams three
  more tensors of that size (log-softmax, its gradient, the logits' gradient). Here the logits are
  written into rows padded to a multiple of 64, turned into softmax probabilities in place, a few
  rows at a time while they sit in cache, and become the logits' gradient (softmax − one-hot) in
  the same buffer: one allocation instead of four, and the backward pass is the two matmuls.
- `dropout`: PyTorch's CPU dropout draws its mask element by element from a Bernoulli
  distribution; drawing uniform numbers and comparing them with p gives the same distribution
  (keep with probability 1 − p, scale by 1 / (1 − p)) in about half the time.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target that is not scored (padding): F.cross_entropy's default ignore_index
ROWS_PER_CHUNK = 16  # softmax rows processed together: 16 × 50,257 fp32 ≈ 3 MB, stays in cache


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the CPU versions apply to x: fp32 on a CPU, eager, outside autocast."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int):
        n, v = h.shape[0], vocab_size
        ignored = targets == IGNORE_INDEX
        ignored = ignored if ignored.any() else None  # None: every target counts (the common case, kept as it was)
        if ignored is not None:
            targets = targets.masked_fill(ignored, 0)  # any valid id; these rows leave the loss and the gradient
        logits = h.new_empty(n, -(-v // 64) * 64)[:, :v]  # rows padded to a multiple of 64 floats
        torch.mm(h, weight[:v].t(), out=logits)
        target_logits = logits.gather(1, targets[:, None]).squeeze(1)
        log_norm = h.new_empty(n)  # log of the softmax denominator (logsumexp) of each row
        for r in range(0, n, ROWS_PER_CHUNK):  # rows -> softmax probabilities, in place
            rows = logits[r:r + ROWS_PER_CHUNK]
            row_max = rows.amax(1, keepdim=True)
            rows.sub_(row_max).exp_()
            total = rows.sum(1, keepdim=True)
            rows.div_(total)
            log_norm[r:r + ROWS_PER_CHUNK] = (row_max + total.log()).squeeze(1)
        if ignored is None:
            loss, ctx.scored = (log_norm - target_logits).mean(), n
        else:  # the mean over the scored rows, as F.cross_entropy's ignore_index gives it (NaN when none is)
            ctx.scored = n - int(ignored.sum())
            loss = (log_norm - target_logits).masked_fill_(ignored, 0.0).sum() / ctx.scored if ctx.scored else \
                h.new_tensor(math.nan)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            logits[torch.arange(n, device=h.device), targets] -= 1.0  # n × d(loss)/d(logits)
            if ignored is not None:
                logits.masked_fill_(ignored[:, None], 0.0)
            ctx.save_for_backward(h, weight)
            ctx.grad_logits, ctx.vocab_size = logits, v
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        h, weight = ctx.saved_tensors
        g, v = ctx.grad_logits, ctx.vocab_size
        scale = grad_loss / max(ctx.scored, 1)
        grad_h = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.mm(g, weight[:v]).mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            torch.mm(g.t(), h * scale, out=grad_weight[:v])
            grad_weight[v:].zero_()  # padded vocabulary rows (pad_vocab) get no gradient
        ctx.grad_logits = None
        return grad_h, grad_weight, None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight[:vocab_size].T against targets, without keeping the logits.

    h (N, C) fp32 on a CPU, weight (V_padded, C) with V_padded >= vocab_size, targets (N,) int64; targets
    -100 (IGNORE_INDEX) are not scored. Equal to `F.cross_entropy(h @ weight[:vocab_size].T, targets)`,
    gradients included.
    """
    return _HeadCrossEntropy.apply(h, weight, targets, vocab_size)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        mask = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))  # 1/(1-p) with probability 1-p, else 0
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal self-attention of q, k, v (B, heads, T, head size) with dropout on the attention weights.

    `F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)`; with dropout on a
    CPU, PyTorch itself falls back to this same arithmetic (its math kernel), which is written out
    here to use the faster dropout mask.
    """
    if dropout_p == 0.0 or not use_cpu_kernels(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    B, H, T, hs = q.shape
    causal = torch.full((T, T), float("-inf"), device=q.device).triu_(1)  # 0 where key <= query, else -inf
    q, k, v = (t.reshape(B * H, T, hs) for t in (q, k, v))
    weights = torch.baddbmm(causal, q, k.transpose(1, 2), alpha=hs ** -0.5)  # (B * H, T, T)
    weights = dropout(torch.softmax(weights, dim=-1), dropout_p, True)
    return torch.bmm(weights, v).view(B, H, T, hs)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with a faster mask on CPUs (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if use_cpu_kernels(x):
        return _Dropout.apply(x, p)
    return F.dropout(x, p, True)


FEW_ROWS = 8  # inputs with at most this many rows (decode steps) take the split matrix-vector path


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; on a CPU without gradients, few rows use both cores.

    A decode step multiplies one row per sequence by every weight matrix. MKL runs such a
    matrix-vector product on one thread, which reads memory at one core's speed (~12 GB/s here);
    as a batched matmul over blocks of the weight's rows, PyTorch spreads the blocks over all
    threads (~22 GB/s), and decoding is bound by exactly that memory traffic. Each block is one
    thread's work, so the result is the same on any number of threads (DecodeThreads relies on it);
    on one thread the blocks run one after another as fast as F.linear.
    """
    if torch.is_grad_enabled() or not use_cpu_kernels(x):  # training, GPUs
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    blocks = next((k for k in (8, 4, 2, 29) if out_features % k == 0), 0)  # 29: GPT-2's 50,257 rows
    if not 0 < rows <= FEW_ROWS or blocks == 0:
        return F.linear(x, weight, bias)
    x2 = x.reshape(1, rows, in_features).expand(blocks, rows, in_features)
    w3 = weight.view(blocks, out_features // blocks, in_features).transpose(1, 2)  # (k, in, out/k)
    y = torch.bmm(x2, w3).transpose(0, 1).reshape(*x.shape[:-1], out_features)  # (..., out)
    return y if bias is None else y.add_(bias)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per sequence attending to every cached key: q (B, nh, 1, hs), k and v (B, n_kv_heads, L, hs).

    `scaled_dot_product_attention` over keys and values repeated for each query group, without the
    repeat: the queries of a group are rows of one product with their shared keys. PyTorch's CPU flash
    kernel splits a single query's keys over threads, so its sums (and the last digits) change with
    the thread count; these products keep each sum on one thread, and a step gives the same numbers
    on any number of threads. Faster too (~50 vs ~85 us a layer at 300 cached positions here).
    """
    B, nh, _, hs = q.shape
    nkv = k.size(1)
    qg = q.reshape(B, nkv, nh // nkv, hs)  # (B, n_kv_heads, group, hs)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(hs ** -0.5)  # (B, n_kv_heads, group, L)
    return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, nh, 1, hs)


class DecodeThreads:
    """How many threads each CPU decode step runs on, chosen by timing the steps as they run.

    A decode step is a few hundred small operations, and every parallel one waits for all its threads.
    On a quiet machine two threads stream the weights nearly twice as fast as one (`linear`); when
    another process holds a core, each parallel region waits for a descheduled thread, and a step can
    take several times as long as on one thread (plain PyTorch's matrix-vector products run on one).
    So the first two steps run on all threads and on one; after that the steps run on whichever was
    faster lately (the mean of its last two timings; a probe's one timing), and now and then one step
    probes the other:
    `probe_every` steps after the choice last changed, then twice as long after each probe that
    confirms it, up to `max_interval` (a probe costs a slow step; a steady machine needs few). The
    chosen count is timed every step, so load that arrives is seen within two steps. The numbers do
    not depend on the choice (`linear`, `decode_attention`), so greedy outputs are identical whatever
    the load. `run(step, *args)` sets the thread count for one step and puts the caller's back
    afterwards; `clock` is injectable for tests.
    """

    def __init__(self, threads: int | None = None, probe_every: int = 16, max_interval: int = 512,
                 clock=time.perf_counter):
        self.threads = threads or torch.get_num_threads()
        self.probe_every, self.max_interval, self.clock = probe_every, max_interval, clock
        self.seconds: dict[int, list[float]] = {}  # thread count -> the seconds of its last two steps
        self.steps, self.interval, self.next_probe, self.chosen = 0, probe_every, probe_every, None

    def best(self) -> int | None:
        """The thread count that was faster lately; None until both were timed (or with one thread)."""
        if self.threads < 2 or len(self.seconds) < 2:
            return None
        return min((self.threads, 1), key=lambda n: sum(self.seconds[n]) / len(self.seconds[n]))

    def choice(self) -> int:
        """The thread count of the next step."""
        if self.threads < 2:
            return self.threads
        best = self.best()
        if best is None:
            return self.threads if self.threads not in self.seconds else 1
        if self.steps >= self.next_probe:
            return 1 if best == self.threads else self.threads
        return best

    def run(self, step, *args):
        """step(*args) on the chosen number of threads, timed; its result."""
        n, before, best = self.choice(), torch.get_num_threads(), self.best()
        probe = best is not None and n != best
        torch.set_num_threads(n)
        try:
            t0 = self.clock()
            out = step(*args)
            seconds = self.clock() - t0
        finally:
            torch.set_num_threads(before)
        self.seconds[n] = [seconds] if probe else self.seconds.get(n, [])[-1:] + [seconds]  # a probe: fresh
        self.steps += 1
        best = self.best()
        if best is not None and best != self.chosen:  # a new choice: check it again soon
            self.chosen, self.interval = best, self.probe_every
            self.next_probe = self.steps + self.interval
        elif probe:  # the probe confirmed the choice: wait twice as long for the next
            self.interval = min(2 * self.interval, self.max_interval)
            self.next_probe = self.steps + self.interval
        return out

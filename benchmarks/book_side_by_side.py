"""The book's chapter-5 run and `gptforge train --recipe book`, side by side, step by step.

*Build a Large Language Model (From Scratch)*, chapter 5, trains its GPTModel (GPT-2 124M at 256
positions, no q/k/v bias, untied head, dropout 0.1) on the-verdict.txt: `torch.manual_seed(123)`,
the model, `torch.optim.AdamW(lr=4e-4, weight_decay=0.1)`, the text cut at 90% of its characters
and each part tokenized alone, windows of 256 at stride 256, a DataLoader with shuffle and drop_last
for training, and after every 5th update an evaluation over 5 batches of each loader (the training
loader reshuffled, drawing from the global RNG). This script holds a reference model written here in
the book's structure (separate q/k/v linears, its own LayerNorm and tanh-GELU, dropout on the
embeddings, the attention weights and each shortcut branch), copies its initial weights into the model
`gptforge train --recipe book` builds, and trains both on the same batches in the same order, the
reference with torch's AdamW as the book builds it, gptforge with its own training step (its
optimizer, loss kernel and dropout). Per step it compares the loss, the gradient norm and the
parameter norm, and the largest difference of any weight.

    python benchmarks/book_side_by_side.py --text the-verdict.txt                # dropout off, 90 steps
    python benchmarks/book_side_by_side.py --text the-verdict.txt --dropout 0.1  # the same masks on both sides
    python benchmarks/book_side_by_side.py --text the-verdict.txt --layers 2 --steps 10   # a quick look

With dropout, both sides draw their masks the same way (uniform numbers compared with p, gptforge's
CPU kernel) from the same RNG state, so they drop the same elements. Prints a table; the last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- the reference, as the book builds it


class BookDropout(nn.Module):
    """Dropout whose mask is uniform numbers >= p (the draw gptforge makes on a CPU); nn.Dropout's Bernoulli
    draw keeps the same share of elements, but with other elements than gptforge's kernel would keep."""

    def __init__(self, p: float, same_masks: bool = True):
        super().__init__()
        self.p, self.same_masks = p, same_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.same_masks:
            return nn.functional.dropout(x, self.p, True)
        return x * (torch.rand_like(x) >= self.p) / (1.0 - self.p)


class BookLayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        variance = centred.pow(2).mean(dim=-1, keepdim=True)  # biased, as the book's var(unbiased=False)
        return self.scale * centred / torch.sqrt(variance + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class BookAttention(nn.Module):
    """Separate query, key and value projections, a causal mask, dropout on the attention weights."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, self.n_heads = cfg["emb_dim"], cfg["n_heads"]
        self.W_query = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(d, d)
        self.dropout = BookDropout(cfg["drop_rate"], cfg["same_masks"])
        ctx = cfg["context_length"]
        self.register_buffer("mask", torch.ones(ctx, ctx).triu(1))  # saved, as the book's state dicts hold it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_heads
        q, k, v = (w(x).view(B, T, self.n_heads, hs).transpose(1, 2) for w in (self.W_query, self.W_key, self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask[:T, :T].bool(), -torch.inf)  # (B, nh, T, T)
        weights = self.dropout(torch.softmax(scores / hs**0.5, dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class BookFeedForward(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), BookGELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BookBlock(nn.Module):
    """Pre-LayerNorm block, its modules registered in the book's order (attention, feed-forward, norms): the order
    torch.manual_seed's draws initialise them in, and the order of the book's state dict and optimizer state."""

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["emb_dim"]
        self.att, self.ff = BookAttention(cfg), BookFeedForward(d)
        self.norm1, self.norm2 = BookLayerNorm(d), BookLayerNorm(d)
        self.drop_shortcut = BookDropout(cfg["drop_rate"], cfg["same_masks"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPT(nn.Module):
    """The chapter's GPTModel: every module left at PyTorch's default initialisation."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = BookDropout(cfg["drop_rate"], cfg["same_masks"])
        self.trf_blocks = nn.Sequential(*(BookBlock(cfg) for _ in range(cfg["n_layers"])))
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))
        return self.out_head(self.final_norm(self.trf_blocks(x)))  # (B, T, vocab)


def book_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def gptforge_state(ref: BookGPT) -> dict[str, torch.Tensor]:
    """The reference's weights under gptforge's GPT-2 names (q, k and v stacked into c_attn)."""
    out = {"wte.weight": ref.tok_emb.weight, "wpe.weight": ref.pos_emb.weight, "lm_head.weight": ref.out_head.weight,
           "ln_f.weight": ref.final_norm.scale, "ln_f.bias": ref.final_norm.shift}
    for i, b in enumerate(ref.trf_blocks):
        att = b.att
        out[f"h.{i}.attn.c_attn.weight"] = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
        if att.W_query.bias is not None:
            out[f"h.{i}.attn.c_attn.bias"] = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
        for name, t in (("attn.c_proj", att.out_proj), ("mlp.c_fc", b.ff.layers[0]), ("mlp.c_proj", b.ff.layers[2])):
            out[f"h.{i}.{name}.weight"], out[f"h.{i}.{name}.bias"] = t.weight, t.bias
        for name, n in (("ln_1", b.norm1), ("ln_2", b.norm2)):
            out[f"h.{i}.{name}.weight"], out[f"h.{i}.{name}.bias"] = n.scale, n.shift
    return {k: v.detach().clone() for k, v in out.items()}


# ----------------------------------------------------------------------------- the book's data


def book_windows(ids: list[int], context: int) -> torch.utils.data.TensorDataset:
    """Windows at stride = context, as the book's GPTDatasetV1 cuts them (starts below len(ids) - context)."""
    starts = range(0, len(ids) - context, context)
    t = torch.tensor(ids)
    x = torch.stack([t[s:s + context] for s in starts]) if starts else torch.empty(0, context, dtype=torch.long)
    y = torch.stack([t[s + 1:s + context + 1] for s in starts]) if starts else x
    return torch.utils.data.TensorDataset(x, y)


def book_loaders(text: str, encode, context: int, batch_size: int, train_ratio: float = 0.9):
    """The chapter's loaders: the text cut by characters, each part tokenized on its own."""
    cut = int(train_ratio * len(text))
    train = book_windows(encode(text[:cut]), context)
    val = book_windows(encode(text[cut:]), context)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            torch.utils.data.DataLoader(val, batch_size=batch_size, shuffle=False, drop_last=False))


# ----------------------------------------------------------------------------- gptforge's side


def gptforge_run_config(text_path: str, overrides: dict):
    """The RunConfig `gptforge train TEXT --recipe book` resolves, with `overrides` as flags (shape, dropout)."""
    from gptforge.training.config import resolve_train_config

    out = Path(tempfile.mkdtemp(prefix="book-side-")) / "run"
    cfg, _ = resolve_train_config([text_path], None, None, None, {"out": str(out), **overrides}, recipe="book")
    return cfg


@dataclass
class GptforgeSide:
    """gptforge's model (built as `train` builds it, then given the reference's weights), its optimizer and its
    training step (training.step.train_step: micro-batch, loss kernel, clipping off, the update)."""

    cfg: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    amp: object
    state: object = None
    last: list = field(default_factory=list)

    @classmethod
    def build(cls, cfg, ref: BookGPT) -> GptforgeSide:
        from gptforge.training.optim import build_optimizer
        from gptforge.training.state import RunState, build_model
        from gptforge.training.step import Precision

        device = torch.device("cpu")
        model = build_model(cfg, device, False, lambda *a: None)
        model.load_state_dict(gptforge_state(ref), strict=True)
        model.train()
        return cls(cfg, model, build_optimizer(model, cfg.train, device), Precision(cfg.train.precision, device),
                   RunState())

    def step(self, x: torch.Tensor, y: torch.Tensor):
        from gptforge.training.state import TrainData
        from gptforge.training.step import train_step

        one = _OneBatch(x, y)
        data = TrainData(one, {}, "", "")
        return train_step(self.model, self.model, self.optimizer, self.amp, self.cfg.train, data, self.state,
                          torch.device("cpu"), [], False)


class _OneBatch:
    """The batches object train_step reads: here always the batch the reference is training on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.xy = (x, y)

    def __len__(self) -> int:
        return 1

    def batch(self, epoch: int, b: int):
        return self.xy


@torch.no_grad()
def gptforge_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from gptforge.evaluate import loss_batch

    return loss_batch(model, x, y).item()


# ----------------------------------------------------------------------------- the comparison


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def largest_difference(ref: BookGPT, model: nn.Module) -> tuple[float, str]:
    """The largest |reference weight - gptforge weight| over every tensor, and the tensor's gptforge name."""
    ours = dict(model.named_parameters())
    worst = max(((float((v - ours[k].detach()).abs().max()), k) for k, v in gptforge_state(ref).items()))
    return worst


def ref_step(ref: BookGPT, optimizer: torch.optim.Optimizer, x, y) -> tuple[float, float]:
    """The book's step: zero_grad, loss, backward, AdamW; returns (loss, gradient norm)."""
    optimizer.zero_grad()
    loss = book_loss(ref, x, y)
    loss.backward()
    grad_norm = norm(p.grad for p in ref.parameters())
    optimizer.step()
    return loss.item(), grad_norm


@torch.no_grad()
def evaluate_both(ref: BookGPT, model: nn.Module, loaders, eval_iter: int) -> dict:
    """The book's evaluate_model for both models on the same batches: the first eval_iter batches of the train
    loader (a fresh shuffle, from the global RNG, as the book's) and of the val loader."""
    ref.eval(), model.eval()
    out = {}
    for name, loader in zip(("train", "val"), loaders):
        batches = [b for _, b in zip(range(eval_iter), loader)]
        out[f"{name}_ref"] = sum(book_loss(ref, x, y).item() for x, y in batches) / len(batches)
        out[f"{name}_ours"] = sum(gptforge_loss(model, x, y) for x, y in batches) / len(batches)
    ref.train(), model.train()
    return out


def side_by_side(text: str, text_path: str, args) -> list[dict]:
    """Both runs, batch by batch; one record per step (and an evaluation every eval_freq steps)."""
    from gptforge.tokenizer import get_tokenizer

    overrides = {"drop_rate": args.dropout, "lr": args.lr}
    if args.layers is not None:
        overrides["n_layers"] = args.layers
    if args.emb_dim is not None:
        overrides.update(emb_dim=args.emb_dim, n_heads=args.heads)
    cfg = gptforge_run_config(text_path, overrides)
    m = cfg.model
    book_cfg = dict(vocab_size=m.vocab_size, context_length=m.context_length, emb_dim=m.emb_dim, n_heads=m.n_heads,
                    n_layers=m.n_layers, drop_rate=m.drop_rate, qkv_bias=m.qkv_bias, same_masks=True)
    torch.manual_seed(args.seed)
    ref = BookGPT(book_cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ours = GptforgeSide.build(cfg, ref)
    torch.manual_seed(args.seed)  # the notebook seeds again before its loaders and its model
    loaders = book_loaders(text, get_tokenizer("gpt2").encode, m.context_length, cfg.train.batch_size)
    records, step = [], 0
    for _epoch in range(cfg.train.epochs):
        for x, y in loaders[0]:
            if step == args.steps:
                return records
            rng = torch.get_rng_state()
            loss_ref, gn_ref = ref_step(ref, ref_opt, x, y)
            after = torch.get_rng_state()
            torch.set_rng_state(rng)  # the same dropout masks
            result = ours.step(x, y)
            torch.set_rng_state(after)
            diff, where = largest_difference(ref, ours.model)
            rec = dict(step=step, loss_ref=loss_ref, loss_ours=result.loss, grad_norm_ref=gn_ref,
                       grad_norm_ours=result.grad_norm, param_norm_ref=norm(ref.parameters()),
                       param_norm_ours=norm(ours.model.parameters()), max_weight_diff=diff, where=where)
            if step % args.eval_freq == 0:
                rec.update(evaluate_both(ref, ours.model, loaders, args.eval_iter))
            records.append(rec)
            print(table_row(rec), flush=True)
            step += 1
    return records


HEADER = (f"{'step':>4} {'loss ref':>9} {'loss ours':>9} {'|d loss|':>8} {'gnorm ref':>9} {'gnorm ours':>10} "
          f"{'pnorm ref':>10} {'|d pnorm|':>9} {'max |dw|':>8} {'eval ref (train/val)':>20} {'eval ours':>13}")


def table_row(r: dict) -> str:
    ev = ""
    if "val_ref" in r:
        ev = f"{r['train_ref']:9.3f}/{r['val_ref']:.3f} {r['train_ours']:6.3f}/{r['val_ours']:.3f}"
    return (f"{r['step']:>4} {r['loss_ref']:9.4f} {r['loss_ours']:9.4f} {abs(r['loss_ref'] - r['loss_ours']):8.1e} "
            f"{r['grad_norm_ref']:9.3f} {r['grad_norm_ours']:10.3f} {r['param_norm_ref']:10.2f} "
            f"{abs(r['param_norm_ref'] - r['param_norm_ours']):9.1e} {r['max_weight_diff']:8.1e} {ev}")


def first_parting(records: list[dict], tol: float) -> dict | None:
    """The first step where the losses or the weights differ by more than tol (relative to the loss), or the gradient
    norms by more than GRAD_NORM_TOL: gptforge reports torch's clip_grad_norm_, summed in fp32, which reads up to
    ~0.1% low on the 38.6M-element head gradient; the reference's is summed in fp64 (the gradients themselves agree
    tensor by tensor to ~1e-8)."""
    for r in records:
        if abs(r["loss_ref"] - r["loss_ours"]) > tol * max(1.0, abs(r["loss_ref"])):
            return dict(step=r["step"], quantity="loss", ref=r["loss_ref"], ours=r["loss_ours"])
        if abs(r["grad_norm_ref"] - r["grad_norm_ours"]) > GRAD_NORM_TOL * r["grad_norm_ref"]:
            return dict(step=r["step"], quantity="grad_norm", ref=r["grad_norm_ref"], ours=r["grad_norm_ours"])
        if r["max_weight_diff"] > tol:
            return dict(step=r["step"], quantity="weight", tensor=r["where"], diff=r["max_weight_diff"])
    return None


GRAD_NORM_TOL = 2e-3


def jumps(records: list[dict], side: str, by: float = 1.0) -> list[int]:
    """Steps whose training loss is more than `by` above the step before's (a spike)."""
    key = f"loss_{side}"
    return [b["step"] for a, b in zip(records, records[1:]) if b[key] - a[key] > by]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="the-verdict.txt from the book's repository (ch02)")
    p.add_argument("--steps", type=int, default=90, help="optimizer steps (the chapter's run: 90)")
    p.add_argument("--dropout", type=float, default=0.0, help="drop rate on both sides (the book's: 0.1)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the 124M shape's 12: a quick look")
    p.add_argument("--emb-dim", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--eval-freq", type=int, default=5)
    p.add_argument("--eval-iter", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-4, help="relative difference counted as parting (float noise: "
                                                          "below it)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    text = Path(args.text).read_text(encoding="utf-8")
    print(HEADER, flush=True)
    records = side_by_side(text, args.text, args)
    parted = first_parting(records, args.tol)
    last = records[-1]
    evals = [r for r in records if "val_ref" in r]
    print(json.dumps(dict(steps=len(records), dropout=args.dropout, seed=args.seed, first_parting=parted,
                          final_loss_ref=last["loss_ref"], final_loss_ours=last["loss_ours"],
                          max_loss_diff=max(abs(r["loss_ref"] - r["loss_ours"]) for r in records),
                          loss_jumps_ref=jumps(records, "ref"), loss_jumps_ours=jumps(records, "ours"),
                          last_eval={k: evals[-1][k] for k in ("step", "train_ref", "val_ref", "train_ours",
                                                               "val_ours")} if evals else None)))


if __name__ == "__main__":
    main()

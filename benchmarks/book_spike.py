"""Which update makes the chapter-5 spike: the book's model (benchmarks/book_side_by_side.py's reference),
dropout off, the book's data order (seed 123), trained through update STOP; then the loss on the next batch with
each group of tensors put back to its value before that update ("reverted"), or with only that group updated.

    python benchmarks/book_spike.py --text the-verdict.txt --stop 18

Prints one line per group; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from book_side_by_side import BookGPT, book_loaders, book_loss, gptforge_run_config


def group(name: str) -> str:
    """A tensor's group: "block 3 attention", "block 3 mlp", "block 3 norms", or the module outside the blocks."""
    if name.startswith("trf_blocks."):
        i, rest = name.split(".")[1], name.split(".", 2)[2]
        part = "attention" if rest.startswith("att.") else "mlp" if rest.startswith("ff.") else "norms"
        return f"block {i} {part}"
    return name.rsplit(".", 1)[0]


def train_through(text_path: str, stop: int, seed: int):
    """The reference through update `stop` as the chapter trains it; returns (model, weights before that update,
    the batch after it). The evaluations' reshuffles are drawn as the book draws them, so the order is the book's."""
    from gptforge.tokenizer import get_tokenizer

    cfg = gptforge_run_config(text_path, {"drop_rate": 0.0})
    m = cfg.model
    torch.manual_seed(seed)
    ref = BookGPT(dict(vocab_size=m.vocab_size, context_length=m.context_length, emb_dim=m.emb_dim,
                       n_heads=m.n_heads, n_layers=m.n_layers, drop_rate=0.0, qkv_bias=False, same_masks=True))
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    torch.manual_seed(seed)
    loaders = book_loaders(open(text_path, encoding="utf-8").read(), get_tokenizer("gpt2").encode,
                           m.context_length, cfg.train.batch_size)
    step, before = 0, {}
    for _epoch in range(cfg.train.epochs):
        for x, y in loaders[0]:
            if step == stop + 1:
                return ref, before, (x, y)
            if step == stop:
                before = {k: v.detach().clone() for k, v in ref.named_parameters()}
            opt.zero_grad()
            book_loss(ref, x, y).backward()
            opt.step()
            if step % 5 == 0:  # the book's evaluate_model iterates both loaders
                for loader in loaders:
                    [b for _, b in zip(range(5), loader)]
            step += 1
    raise SystemExit(f"--stop {stop}: the run has {step} updates")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True)
    p.add_argument("--stop", type=int, default=18, help="the update to take apart (book order, seed 123: 18)")
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args()
    ref, before, batch = train_through(args.text, args.stop, args.seed)
    after = {k: v.detach().clone() for k, v in ref.named_parameters()}
    params = dict(ref.named_parameters())
    ref.eval()

    @torch.no_grad()
    def loss_with(weights: dict) -> float:
        for k, p in params.items():
            p.copy_(weights[k])
        return book_loss(ref, *batch).item()

    rows = {"after": loss_with(after), "before": loss_with(before)}
    print(f"next batch: {rows['after']:.3f} after update {args.stop}, {rows['before']:.3f} before it")
    for g in dict.fromkeys(map(group, after)):
        reverted = loss_with({k: before[k] if group(k) == g else after[k] for k in after})
        alone = loss_with({k: after[k] if group(k) == g else before[k] for k in after})
        rows[g] = dict(reverted=reverted, alone=alone)
        print(f"{g:20s} reverted {reverted:8.3f}   only it updated {alone:8.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

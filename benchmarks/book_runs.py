"""`gptforge train the-verdict.txt --recipe book` over several seeds, against the book's published chapter-5 log.

    python benchmarks/book_runs.py --text the-verdict.txt --seeds 1 2 3 4 5 --runs /tmp/book-runs \\
        --plot benchmarks/book_runs.png

Each seed is one `gptforge train TEXT --recipe book --seed S` (a fresh process, as a reader runs it); with
--reuse, runs already finished under --runs are read, not trained again. The band (issue 26): the untrained
loss within 0.1 of 10.98, after the 10 epochs train loss <= 0.8 and val loss in 6.0-6.7, and no evaluation
more than 1.0 above the one before it. The book evaluates after its update number step + 1 (its "Step 0" comes
after the first update); gptforge after `step` updates, step 0 before any: the plot puts both at updates done.
Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# The chapter's published run (ch05.ipynb, `train_model_simple(..., eval_freq=5, eval_iter=5)`): its step, train
# loss, val loss; the step counts updates from 0, each evaluation coming after update step + 1.
BOOK_LOG = [
    (0, 9.817, 9.924), (5, 8.066, 8.332), (10, 6.619, 7.042), (15, 6.046, 6.596), (20, 5.524, 6.508),
    (25, 5.369, 6.378), (30, 4.830, 6.263), (35, 4.586, 6.285), (40, 3.879, 6.130), (45, 3.530, 6.183),
    (50, 2.960, 6.123), (55, 2.832, 6.150), (60, 2.104, 6.133), (65, 1.691, 6.186), (70, 1.391, 6.230),
    (75, 1.059, 6.251), (80, 0.800, 6.278), (85, 0.569, 6.373),
]
UNTRAINED, FINAL_TRAIN, FINAL_VAL, JUMP = (10.98, 0.1), 0.8, (6.0, 6.7), 1.0


def train(text: str, seed: int, out: Path) -> None:
    cmd = [sys.executable, "-m", "gptforge", "train", text, "--recipe", "book", "--seed", str(seed), "--out", str(out),
           "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def book_run(text_path: str, seed: int, out: Path) -> None:
    """The chapter's own flow, in-process, with benchmarks/book_side_by_side.py's reference model and torch's
    dropout: torch.manual_seed(seed) before the loaders and again before the model, AdamW(lr=4e-4,
    weight_decay=0.1), evaluate_model over 5 batches after every 5th update (and after the last); written as
    metrics.jsonl eval records at `step` = updates done, as gptforge writes them."""
    import torch
    from book_side_by_side import BookGPT, book_loaders, book_loss

    from gptforge.tokenizer import get_tokenizer

    cfg = dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
               qkv_bias=False, same_masks=False)
    torch.manual_seed(seed)
    loaders = book_loaders(Path(text_path).read_text(encoding="utf-8"), get_tokenizer("gpt2").encode, 256, 2)
    torch.manual_seed(seed)
    model = BookGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    records, updates = [], 0

    @torch.no_grad()
    def evaluate() -> None:
        model.eval()
        losses = [sum(book_loss(model, x, y).item() for x, y in batches) / len(batches)
                  for batches in ([b for _, b in zip(range(5), loader)] for loader in loaders)]
        model.train()
        records.append(dict(event="eval", step=updates, train_loss=losses[0], val_loss=losses[1]))

    rng = torch.get_rng_state()
    evaluate()  # untrained; the RNG put back, so the training draws what the notebook's draws
    torch.set_rng_state(rng)
    for _epoch in range(10):
        for x, y in loaders[0]:
            optimizer.zero_grad()
            book_loss(model, x, y).backward()
            optimizer.step()
            updates += 1
            if (updates - 1) % 5 == 0:
                evaluate()
    evaluate()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "eval"]


def band(evals: list[dict]) -> dict:
    """The issue's checks for one run's evaluations."""
    first, last = evals[0], evals[-1]
    jumps = [(b["step"], k, b[k] - a[k]) for a, b in zip(evals, evals[1:]) for k in ("train_loss", "val_loss")
             if b[k] - a[k] > JUMP]
    checks = {
        "untrained": all(abs(first[k] - UNTRAINED[0]) <= UNTRAINED[1] for k in ("train_loss", "val_loss")),
        "final_train": last["train_loss"] <= FINAL_TRAIN,
        "final_val": FINAL_VAL[0] <= last["val_loss"] <= FINAL_VAL[1],
        "no_spike": not jumps,
    }
    return dict(checks, in_band=all(checks.values()), jumps=jumps)


def plot(runs: dict[int, list[dict]], path: Path, who: str = "gptforge") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, col in ((ax_train, "train_loss", 1), (ax_val, "val_loss", 2)):
        for seed, evals in runs.items():
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], lw=1, alpha=0.8, label=f"{who} seed {seed}")
        ax.plot([s + 1 for s, *_ in BOOK_LOG], [row[col] for row in BOOK_LOG], "k--o", ms=3, lw=1.5,
                label="the book (ch05.ipynb)")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("cross-entropy (nats)")
    ax_val.legend(fontsize=8)
    what = "the book's code" if who != "gptforge" else "gptforge train the-verdict.txt --recipe book"
    fig.suptitle(f"{what}, against the book's chapter-5 log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="the-verdict.txt (the book's repository, ch02)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--runs", required=True, help="directory for the run directories (seed-S)")
    p.add_argument("--reuse", action="store_true", help="read finished runs instead of training them again")
    p.add_argument("--plot", default=None, help="PNG of the curves beside the book's")
    p.add_argument("--book", action="store_true", help="run the book's own flow (the reference model of "
                                                      "book_side_by_side.py) instead of gptforge train")
    args = p.parse_args()
    runs = {}
    for seed in args.seeds:
        run = Path(args.runs) / f"seed-{seed}"
        if not (args.reuse and (run / "metrics.jsonl").is_file()):
            (book_run if args.book else train)(args.text, seed, run)
        runs[seed] = evaluations(run)
    results = {seed: band(evals) for seed, evals in runs.items()}
    steps = [r["step"] for r in next(iter(runs.values()))]
    print("step  " + "  ".join(f"seed {s:<3} train/val" for s in runs))
    for i, step in enumerate(steps):
        print(f"{step:>4}  " + "  ".join(f"{e[i]['train_loss']:7.3f}/{e[i]['val_loss']:6.3f}" for e in runs.values()))
    for seed, r in results.items():
        print(f"seed {seed}: {'in band' if r['in_band'] else 'OUT of band'} "
              + ", ".join(k for k in ("untrained", "final_train", "final_val", "no_spike") if not r[k]))
    if args.plot:
        plot(runs, Path(args.plot), "book code" if args.book else "gptforge")
    summary = {str(seed): dict(loss_step0=(runs[seed][0]["train_loss"], runs[seed][0]["val_loss"]),
                               loss_final=(runs[seed][-1]["train_loss"], runs[seed][-1]["val_loss"]),
                               **results[seed]) for seed in runs}
    print(json.dumps(dict(in_band=sum(r["in_band"] for r in results.values()), seeds=len(runs), runs=summary)))


if __name__ == "__main__":
    main()

"""Time to score downstream items: gptforge against lm-evaluation-harness, same items, same model, same process.

    python benchmarks/downstream.py                        # 1,000 items, the GPT-2 124M shape
    python benchmarks/downstream.py --items 200            # what a shared 2-core CPU finishes in ~10 minutes
    python benchmarks/downstream.py --items 24 --sweep 1,4,8,16   # gptforge's batch sizes, harness's too
    python benchmarks/downstream.py --data hellaswag_val.jsonl    # the real file, if you have it
    python benchmarks/downstream.py --items 24 --num-fewshot 5    # few-shot contexts (a synthesised train split)
    python benchmarks/downstream.py --task winogrande --items 200 # a schema task (WinoGrande-shaped items)

The official hellaswag_val.jsonl cannot be downloaded here, so without --data the items are
synthesised in its format (ctx_a, ctx_b, activity_label, endings, label) from English text that
ships with Python, with HellaSwag's shape: a 15-60 word context, four 6-25 word endings. The model
is the 124M shape with random weights (seeded), exported with `to_hf`; lm-evaluation-harness's
`HFLM(pretrained=DIR)` scores the same (context, " " + ending) requests with `loglikelihood`, as
its hellaswag task sends them, and gptforge scores the directory as `gptforge eval DIR --task
hellaswag FILE` does. Each side's time covers tokenising and scoring, not loading. Reported: items/s
of each, the speed-up, the largest per-continuation log-likelihood difference and both sides'
acc / acc_norm. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def synthesise(n: int, seed: int = 0) -> list[dict]:
    """n HellaSwag-format records made of words from pydoc's help topics."""
    from pydoc_data.topics import topics

    words = [w for k in sorted(topics) for w in topics[k].split() if w.isalpha()]
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"ind": i, "activity_label": text(1, 3).title(), "ctx_a": text(12, 55) + ".", "ctx_b": text(2, 5),
             "endings": [text(6, 25) + "." for _ in range(4)], "label": rng.randrange(4), "split": "val"}
            for i in range(n)]


def synthesise_winogrande(n: int, seed: int = 0) -> list[dict]:
    """n WinoGrande-format records (a 10-25 word sentence with a blank, two one-word options)."""
    from pydoc_data.topics import topics

    words = [w for k in sorted(topics) for w in topics[k].split() if w.isalpha()]
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    return [{"qID": str(i), "sentence": f"{text(6, 15)} _ {text(4, 10)}.", "option1": rng.choice(words),
             "option2": rng.choice(words), "answer": rng.choice("12")} for i in range(n)]


SYNTHESISE = {"hellaswag": synthesise, "winogrande": synthesise_winogrande}


def run_gptforge(hf_dir: Path, data: Path, n: int, batch_size: int, shots: int = 0, train: Path | None = None,
                 task: str = "hellaswag"):
    from gptforge.evaluate.tasks import PreparedTask, score_task, task_items
    from gptforge.weights import load_for_text

    model, tokenizer, _ = load_for_text(hf_dir)
    items = task_items(task, data, n, shots, {task: str(train)} if train else None)
    t0 = time.perf_counter()
    prepared = PreparedTask.build(task, items, tokenizer, model.cfg.context_length)
    metrics, results = score_task(model, prepared, batch_size, "cpu")
    return time.perf_counter() - t0, metrics, results, items


def run_harness(hf_dir: Path, items, batch_size: int):
    import numpy as np
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=batch_size)
    requests = [Instance("loglikelihood", {}, pair, k) for it in items for k, pair in enumerate(it.pairs())]
    t0 = time.perf_counter()
    flat = iter(lm.loglikelihood(requests, disable_tqdm=True))
    seconds = time.perf_counter() - t0
    results = [[next(flat) for _ in it.pairs()] for it in items]
    acc = [np.argmax([ll for ll, _ in r]) == it.label for it, r in zip(items, results)]
    metrics = {"acc": float(np.mean(acc))}
    if items[0].contexts is None:  # schema tasks report acc alone
        norm = [np.argmax([ll / len(c) for (ll, _), c in zip(r, it.choices)]) == it.label
                for it, r in zip(items, results)]
        metrics["acc_norm"] = float(np.mean(norm))
    return seconds, {**metrics, "n": len(items)}, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="hellaswag", choices=sorted(SYNTHESISE), help="the task to score")
    p.add_argument("--items", type=int, default=1000, help="items to score")
    p.add_argument("--data", type=Path, default=None, help="a real hellaswag_val.jsonl (default: synthesised)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (12: the 124M shape)")
    p.add_argument("--batch-size", type=int, default=8, help="gptforge's rows (items) per forward")
    p.add_argument("--harness-batch-size", type=int, default=8, help="lm-evaluation-harness's requests per forward")
    p.add_argument("--sweep", default=None, help="comma-separated batch sizes to time for both instead")
    p.add_argument("--num-fewshot", type=int, default=0, help="examples before each item, drawn from a synthesised "
                                                              "train split as the harness draws them")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from gptforge.models.gpt2 import GPT, PRESETS, GPTConfig
    from gptforge.weights import to_hf

    tmp = Path(tempfile.mkdtemp(prefix="downstream-"))
    data = args.data
    if data is None:
        data = tmp / f"{args.task}_synthetic.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in SYNTHESISE[args.task](args.items)))
    train = None
    if args.num_fewshot:
        train = tmp / f"{args.task}_train_synthetic.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in SYNTHESISE[args.task](200, seed=1)))
    torch.manual_seed(0)
    hf_dir = to_hf(GPT(GPTConfig(**{**PRESETS["gpt2-small"], "n_layers": args.layers})).eval(), tmp / "hf")
    print(f"model: GPT-2 124M shape ({args.layers} layers), random weights; {args.items} {args.task} items "
          f"({'synthesised' if args.data is None else data}), {args.num_fewshot}-shot; {torch.get_num_threads()} "
          "threads", flush=True)
    if args.sweep:
        for bs in (int(b) for b in args.sweep.split(",")):
            ours = run_gptforge(hf_dir, data, args.items, bs, args.num_fewshot, train, args.task)
            theirs = run_harness(hf_dir, ours[3], bs)
            print(f"batch {bs:3d}: gptforge {args.items / ours[0]:.2f} items/s, harness "
                  f"{args.items / theirs[0]:.2f} items/s", flush=True)
        return
    seconds, metrics, results, items = run_gptforge(hf_dir, data, args.items, args.batch_size, args.num_fewshot,
                                                    train, args.task)
    print(f"gptforge: {seconds:.1f} s, {len(items) / seconds:.2f} items/s, {metrics}", flush=True)
    h_seconds, h_metrics, h_results = run_harness(hf_dir, items, args.harness_batch_size)
    print(f"lm-evaluation-harness: {h_seconds:.1f} s, {len(items) / h_seconds:.2f} items/s, {h_metrics}", flush=True)
    diff = max(abs(a[0] - b[0]) for ra, rb in zip(results, h_results) for a, b in zip(ra, rb))
    same = metrics == h_metrics
    print(f"speed-up {h_seconds / seconds:.2f}x; largest log-likelihood difference {diff:.2e}; "
          f"acc/acc_norm {'identical' if same else 'DIFFER'}")
    print(json.dumps({"task": args.task, "items": len(items), "synthetic": args.data is None, "layers": args.layers,
                      "num_fewshot": args.num_fewshot,
                      "gptforge_seconds": round(seconds, 2), "harness_seconds": round(h_seconds, 2),
                      "gptforge_items_per_s": round(len(items) / seconds, 3),
                      "harness_items_per_s": round(len(items) / h_seconds, 3),
                      "speedup": round(h_seconds / seconds, 3), "max_ll_diff": diff, "same_acc": same,
                      "gptforge": metrics, "harness": h_metrics,
                      "batch_size": args.batch_size, "harness_batch_size": args.harness_batch_size}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

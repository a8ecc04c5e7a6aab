"""Time to score CORE tasks: gptforge's batched scoring against nanochat's per-item evaluator, same items, same model.

    python benchmarks/core_speed.py                        # 24 items per task, 5-shot, the GPT-2 124M shape
    python benchmarks/core_speed.py --items 8 --layers 2   # a quick look

The DCLM eval bundle cannot be downloaded here, so a bundle is synthesised in its format: three tasks, one of
each kind (multiple choice with HellaSwag's shape: a 15-60 word query, four 6-25 word choices; schema with
Winograd's: two contexts of 10-20 words, a 4-8 word continuation; language modelling with LAMBADA's: a 30-60
word context, one word), each `--shots`-shot, words from English text that ships with Python. The model is the
124M shape with random weights (seeded). Both sides render and tokenize the same prompts (icl.py) and cut them
at the context; the baseline then does what nanochat's `core_eval.evaluate_example` does: one forward per item
over its options stacked and padded, logits at every position, the mean cross-entropy over each option's scored
tokens (or the greedy check). gptforge scores the same items as `gptforge eval --suite core` does: an item's
options share their common tokens (the few-shot examples) in one row, the LM head runs only on scored tokens,
and `--batch-size` rows of many items go through each forward. Reported: items/s of each, the speed-up, whether
every item's verdict agrees and the largest mean-loss difference. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def words_from_python() -> list[str]:
    from pydoc_data.topics import topics

    return [w for k in sorted(topics) for w in topics[k].split() if w.isalpha()]


def synthesise(root: Path, n: int, shots: int, seed: int = 0) -> Path:
    """A DCLM-format bundle of three n-item tasks in root."""
    words, rng = words_from_python(), random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    tasks = {
        "mc_hellaswag_like": ("multiple_choice", 25.0, [
            {"query": text(15, 60) + ".", "choices": [text(6, 25) + "." for _ in range(4)], "gold": rng.randrange(4)}
            for _ in range(n)]),
        "schema_winograd_like": ("schema", 50.0, [
            {"context_options": [text(10, 20) for _ in range(2)], "continuation": text(4, 8) + ".",
             "gold": rng.randrange(2)} for _ in range(n)]),
        "lm_lambada_like": ("language_modeling", 0.0, [
            {"context": text(30, 60), "continuation": rng.choice(words)} for _ in range(n)]),
    }
    (root / "eval_data").mkdir(parents=True)
    yaml = ["icl_tasks:"]
    for label, (kind, _, records) in tasks.items():
        (root / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        yaml += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{shots}]",
                 f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
    (root / "core.yaml").write_text("\n".join(yaml) + "\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n" + "".join(
        f"{label},{b}\n" for label, (_, b, _) in tasks.items()))
    return root


def nanochat_style(model, task, items, wheres, tokenizer, max_length):
    """Per item: its prompts as icl.py renders and cuts them, then one forward of the stacked options with all
    logits (nanochat's forward_model), the mean loss over each option's scored tokens; (right, losses) each."""
    import torch
    import torch.nn.functional as F

    from gptforge.evaluate.icl import FEWSHOT_SEED, bos_id, cut, encode, render

    bos, out = bos_id(tokenizer), []
    for i, (item, where) in enumerate(zip(items, wheres)):
        others = [j for j in range(len(items)) if j != i]
        shots = [items[j] for j in random.Random(FEWSHOT_SEED + i).sample(others, task.num_fewshot)]
        tokens, starts = encode(task.kind, render(task.kind, item, task.delimiter, shots), tokenizer, bos, where)
        tokens, starts, _ = cut(tokens, starts, max_length, where)
        ids = torch.full((len(tokens), max(map(len, tokens))), bos, dtype=torch.long)
        for k, t in enumerate(tokens):
            ids[k, :len(t)] = torch.tensor(t)
        with torch.no_grad():
            logits = model(ids)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        losses = losses.view(len(tokens), -1)
        means = [losses[k, s - 1:len(t) - 1].mean().item() for k, (t, s) in enumerate(zip(tokens, starts))]
        if task.kind == "language_modeling":
            t, s = tokens[0], starts[0]
            right = bool((logits[0, s - 1:len(t) - 1].argmax(-1) == ids[0, s:len(t)]).all())
        else:
            right = means.index(min(means)) == item["gold"]
        out.append((right, means))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=24, help="items per task")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples per item (every task)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (12: the 124M shape)")
    p.add_argument("--batch-size", type=int, default=8, help="gptforge's rows per forward")
    args = p.parse_args()
    import torch

    from gptforge.evaluate.core import PreparedCore, read_bundle, read_items, score_core_task
    from gptforge.models import build
    from gptforge.models.gpt2 import PRESETS, GPTConfig
    from gptforge.tokenizer import get_tokenizer

    bundle = synthesise(Path(tempfile.mkdtemp(prefix="core-speed-")) / "bundle", args.items, args.shots)
    torch.manual_seed(0)
    model = build(GPTConfig(**{**PRESETS["gpt2-small"], "n_layers": args.layers})).eval()
    tokenizer, ctx = get_tokenizer("gpt2"), model.cfg.context_length
    print(f"model: GPT-2 124M shape ({args.layers} layers), random weights; 3 tasks x {args.items} items, "
          f"{args.shots}-shot (synthesised); {torch.get_num_threads()} threads", flush=True)
    rows, ours_s, theirs_s, agree, diff = [], 0.0, 0.0, True, 0.0
    for task in read_bundle(bundle):
        items = read_items(task)
        t0 = time.perf_counter()
        metrics, mine = score_core_task(model, PreparedCore.build(task, items, tokenizer, ctx), args.batch_size,
                                        "cpu")
        t1 = time.perf_counter()
        theirs = nanochat_style(model, task, *items, tokenizer, ctx)
        t2 = time.perf_counter()
        same = [a for a, _ in mine] == [b for b, _ in theirs]
        d = max(abs(x - y) for (_, a), (_, b) in zip(mine, theirs) for x, y in zip(a, b))
        ours_s, theirs_s, agree, diff = ours_s + t1 - t0, theirs_s + t2 - t1, agree and same, max(diff, d)
        rows.append({"task": task.label, "gptforge_s": round(t1 - t0, 2), "nanochat_style_s": round(t2 - t1, 2),
                     "speedup": round((t2 - t1) / (t1 - t0), 2), "accuracy": metrics["accuracy"], "same": same})
        print(f"{task.label}: gptforge {t1 - t0:.1f} s, nanochat-style {t2 - t1:.1f} s "
              f"({(t2 - t1) / (t1 - t0):.2f}x), accuracy {metrics['accuracy']:.3f}, verdicts "
              f"{'identical' if same else 'DIFFER'}, largest mean-loss difference {d:.1e}", flush=True)
    n = 3 * args.items
    print(f"all: gptforge {n / ours_s:.2f} items/s, nanochat-style {n / theirs_s:.2f} items/s, "
          f"speed-up {theirs_s / ours_s:.2f}x")
    print(json.dumps({"items": n, "shots": args.shots, "layers": args.layers, "batch_size": args.batch_size,
                      "gptforge_items_per_s": round(n / ours_s, 3),
                      "nanochat_style_items_per_s": round(n / theirs_s, 3),
                      "speedup": round(theirs_s / ours_s, 3), "same_verdicts": agree, "max_mean_loss_diff": diff,
                      "tasks": rows}))


if __name__ == "__main__":
    main()

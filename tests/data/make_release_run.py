"""Make tests/data/release-0.1: a run directory and prepared data written by gptforge 0.1.0 (commit 59ce805).

Run with that release's code, from a checkout of it, so the files are what that release wrote:

    git worktree add /tmp/gptforge-0.1 59ce805
    PYTHONPATH=/tmp/gptforge-0.1/src python tests/data/make_release_run.py tests/data/release-0.1

It trains a 320-id tokenizer on Python's help topics, prepares them into shards, trains a tiny
model on the shards for 6 steps (one checkpoint kept) and records what the release's own eval and
generate print for it in expected.json; tests/test_release.py checks the current code against it.
All paths in the run's config.toml are relative to the directory, as the test runs there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def gptforge(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, check=True)
    return proc.stdout


def main(out: Path) -> None:
    from pydoc_data.topics import topics

    import gptforge as release

    out.mkdir(parents=True)
    os.chdir(out)
    Path("corpus").mkdir()
    for i, key in enumerate(sorted(topics)[:8]):
        Path(f"corpus/{i:02d}.txt").write_text(topics[key], encoding="utf-8")
    gptforge("tokenizer", "train", "corpus", "--vocab-size", "320", "--out", "tok")
    gptforge("prepare", "corpus", "--out", "data", "--tokenizer", "tok", "--val-docs", "2",
             "--workers", "0", "--no-progress")
    gptforge("train", "data", "--out", "run", "--preset", "tiny", "--context-length", "32", "--emb-dim", "16",
             "--n-heads", "2", "--n-layers", "1", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3",
             "--eval-batches", "2", "--save-every", "3", "--keep-last", "1", "--sample-tokens", "4",
             "--seed", "11", "--device", "cpu", "--no-progress", "--log-every", "1")
    eval_line = gptforge("eval", "run", "data", "--device", "cpu", "--json").strip().splitlines()[-1]
    sample = gptforge("generate", "run", "--prompt", "The", "--max-new-tokens", "8", "--temperature", "0",
                      "--device", "cpu")
    expected = {"release": release.__version__, "commit": "59ce805", "eval": json.loads(eval_line),
                "generate": sample}
    Path("expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    Path("corpus").rename(".corpus-unused")  # the run reads the shards only; the texts are not needed
    subprocess.run(["rm", "-r", ".corpus-unused"], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())

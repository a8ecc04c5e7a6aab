"""Benchmark `gptforge prepare` and the shard data loader on synthetic corpora (default 100 MB and 1 GB).

For each size it writes a JSON Lines corpus to /tmp (English paragraphs from pydoc's help topics,
shuffled into documents of 1-16 KB with a seeded generator), then measures:

- `gptforge prepare` with 1 and with 2 workers: MB/s of input and peak memory of the whole process
  tree (sum of RSS of the main process and its workers, and the sum of PSS, which counts pages the
  forked workers share with the main process once);
- tiktoken alone encoding the same texts (GPT-2, `encode_ordinary_batch`) on 1 and 2 threads: the
  texts are read in batches of 64 MB and only the encoding is timed;
- CPU seconds of each (the whole process tree; the machine is shared, so MB per CPU-second is the
  figure that load from other processes does not move);
- the training data loader (`RandomBatches` over the memory-mapped shards, 16 x 1024 tokens a batch):
  batches/s and peak RSS (anonymous and file-backed: mapped shard pages count as file-backed RSS, which
  the kernel can drop at any time).

    python benchmarks/prepare_bench.py                   # 100 MB and 1 GB
    python benchmarks/prepare_bench.py --sizes-mb 100    # just 100 MB

Prints a table per size; the last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

TMP = Path("/tmp/gptforge-prepare-bench")


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    if path.is_file() and path.stat().st_size >= size_mb * 1_000_000:
        return
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for t in topics.values() for p in t.split("\n\n") if len(p.strip()) > 40]
    rng = random.Random(seed)
    target = size_mb * 1_000_000
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            doc, n = [], rng.randint(1_000, 16_000)
            while sum(map(len, doc)) < n:
                doc.append(rng.choice(paragraphs))
            line = json.dumps({"text": "\n\n".join(doc)}) + "\n"
            f.write(line)
            written += len(line.encode())
    os.replace(tmp, path)


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over a process and its children."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def run_measured(cmd: list[str]) -> dict:
    """Run a command; wall seconds, CPU seconds (its tree) and peak tree RSS / PSS, sampled every 0.1 s."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    th.join()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak[0] / 1e6, "peak_pss_mb": peak[1] / 1e6,
            "stdout": out}


def bench_prepare(corpus: Path, workers: int) -> dict:
    out = TMP / f"data-{corpus.stem}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    r = run_measured([sys.executable, "-m", "gptforge", "prepare", str(corpus), "--out", str(out), "--workers",
                      str(workers), "--no-progress"])
    mb = corpus.stat().st_size / 1e6
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    return {"workers": workers, "mb_per_s": mb / r["seconds"], "seconds": r["seconds"],
            "mb_per_cpu_s": mb / r["cpu_seconds"], "cpu_seconds": r["cpu_seconds"], "tokens": tokens,
            "peak_rss_mb": r["peak_rss_mb"], "peak_pss_mb": r["peak_pss_mb"], "data_dir": str(out)}


TIKTOKEN_ALONE = r"""
import json, sys, time
sys.path.insert(0, "src")
from gptforge.tokenizer import _gpt2_encoding
enc = _gpt2_encoding()
path, threads = sys.argv[1], int(sys.argv[2])
seconds, cpu, nbytes, batch, size = 0.0, 0.0, 0, [], 0
def run(batch):
    global cpu
    t0, c0 = time.perf_counter(), time.process_time()
    enc.encode_ordinary_batch(batch, num_threads=threads)
    cpu += time.process_time() - c0
    return time.perf_counter() - t0
with open(path, "rb") as f:
    for line in f:
        nbytes += len(line)
        text = json.loads(line)["text"]
        batch.append(text)
        size += len(line)
        if size >= 64_000_000:
            seconds += run(batch)
            batch, size = [], 0
if batch:
    seconds += run(batch)
print(json.dumps({"seconds": seconds, "cpu": cpu, "bytes": nbytes}))
"""


def bench_tiktoken(corpus: Path, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", TIKTOKEN_ALONE, str(corpus), str(threads)], capture_output=True,
                       text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"threads": threads, "mb_per_s": res["bytes"] / 1e6 / res["seconds"], "seconds": res["seconds"],
            "mb_per_cpu_s": res["bytes"] / 1e6 / res["cpu"], "cpu_seconds": res["cpu"]}


LOADER = r"""
import json, sys, time
from pathlib import Path
from gptforge.data import RandomBatches, TokenWindows, Batches, open_prepared
data, seconds, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
train, val = open_prepared(data)
B, T = 16, 1024
if mode == "random":
    batches = RandomBatches(train, T, B, seed=0)
else:
    batches = Batches(TokenWindows(train, T), B, shuffle=False, drop_last=True)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds and n < len(batches):
    x, y = batches.batch(0, n)
    n += 1
dt = time.perf_counter() - t0
lines = Path("/proc/self/status").read_text().splitlines()
keep = ("VmHWM", "RssAnon", "RssFile")
status = {k: int(v.split()[0]) * 1024 for k, v in (s.split(":", 1) for s in lines) if k in keep}
print(json.dumps({"batches": n, "seconds": dt, "train_tokens": len(train), **status}))
"""


def bench_loader(data_dir: str, mode: str, seconds: float) -> dict:
    r = subprocess.run([sys.executable, "-c", LOADER, data_dir, str(seconds), mode], capture_output=True, text=True,
                       check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"mode": mode, "batches_per_s": res["batches"] / res["seconds"],
            "tokens_per_s": res["batches"] * 16 * 1024 / res["seconds"], "peak_rss_mb": res["VmHWM"] / 1e6,
            "rss_anon_mb": res["RssAnon"] / 1e6, "rss_file_mb": res["RssFile"] / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--loader-seconds", type=float, default=20.0)
    args = ap.parse_args()
    TMP.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "load_avg_start": os.getloadavg(), "commit": commit, "sizes": {}}
    for size in args.sizes_mb:
        corpus = TMP / f"corpus-{size}mb.jsonl"
        make_corpus(corpus, size)
        r: dict = {"corpus_mb": corpus.stat().st_size / 1e6}
        r["prepare"] = [bench_prepare(corpus, w) for w in (1, 2)]
        r["tiktoken_alone"] = [bench_tiktoken(corpus, t) for t in (1, 2)]
        data_dir = r["prepare"][1]["data_dir"]
        r["loader"] = [bench_loader(data_dir, m, args.loader_seconds) for m in ("random", "sequential")]
        p1, p2 = r["prepare"]
        t1, t2 = r["tiktoken_alone"]
        r["speedup_2_workers"] = p2["mb_per_s"] / p1["mb_per_s"]
        r["vs_tiktoken_1"] = p1["mb_per_s"] / t1["mb_per_s"]
        r["vs_tiktoken_2"] = p2["mb_per_s"] / t2["mb_per_s"]
        r["cpu_efficiency_vs_tiktoken"] = [p["mb_per_cpu_s"] / t["mb_per_cpu_s"] for p, t in zip((p1, p2), (t1, t2))]
        results["sizes"][f"{size}mb"] = r
        print(f"\n{size} MB corpus ({r['corpus_mb']:.0f} MB, {p1['tokens']:,} tokens)")
        print(f"{'':28}{'MB/s':>8}{'MB/CPU-s':>10}{'peak RSS MB':>13}{'peak PSS MB':>13}")
        for p in r["prepare"]:
            print(f"{'prepare, ' + str(p['workers']) + ' worker(s)':28}{p['mb_per_s']:8.2f}{p['mb_per_cpu_s']:10.2f}"
                  f"{p['peak_rss_mb']:13.0f}{p['peak_pss_mb']:13.0f}")
        for t in r["tiktoken_alone"]:
            print(f"{'tiktoken alone, ' + str(t['threads']) + ' thread(s)':28}{t['mb_per_s']:8.2f}"
                  f"{t['mb_per_cpu_s']:10.2f}")
        print(f"2 workers / 1 worker: {r['speedup_2_workers']:.2f}x; prepare / tiktoken alone: "
              f"{r['vs_tiktoken_1']:.2f} (1), {r['vs_tiktoken_2']:.2f} (2); per CPU-second: "
              f"{r['cpu_efficiency_vs_tiktoken'][0]:.2f} (1), {r['cpu_efficiency_vs_tiktoken'][1]:.2f} (2)")
        for ld in r["loader"]:
            print(f"loader {ld['mode']:10}: {ld['batches_per_s']:.0f} batches/s ({ld['tokens_per_s'] / 1e6:.1f}M "
                  f"tokens/s), peak RSS {ld['peak_rss_mb']:.0f} MB (anon {ld['rss_anon_mb']:.0f}, "
                  f"file-backed {ld['rss_file_mb']:.0f})")
    results["load_avg_end"] = os.getloadavg()
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""benchmarks/gpu_check.py --dry-run: the whole GPU check (gpu tests, bench train with and without document masks,
bench generate, bench quality) runs end to end on the CPU in its quick mode, and its JSON last line holds every row."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tests"]["rc"] == 0 and report["tests"]["skipped"] >= 15 and not report["tests"].get("failed")
    rows = report["train"]
    assert {r["model"] for r in rows} == {"gpt2-tiny", "llama-tiny-moe"} and len(rows) == 6
    for r in rows:
        if r["attention"] == "flex":  # FlexAttention trains on GPUs only
            assert r["error"].startswith("skipped") and r["tokens_per_s"] is None
        else:
            assert r["error"] == "" and r["tokens_per_s"] > 0 and r["batch"] in (8, 4) and r["peak_mem_gb"] > 0
    assert {(r["document_mask"], r["attention"]) for r in rows} == {(False, "sdpa"), (True, "sdpa"), (True, "flex")}
    assert all(r["decode_tokens_per_s"] > 0 and r["error"] == "" for r in report["generate"])
    assert math.isfinite(report["quality"]["val_bpb"]) and report["quality"]["steps"] > 0
    assert "gpu tests: " in proc.stdout and "tokens/s" in proc.stdout  # the table before the JSON

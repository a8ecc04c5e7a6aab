"""Fault injection: SIGKILL a training run at random moments, resume each time, compare bit for bit."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gptforge import checkpoint as ckpt

ARGS = ["--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--max-steps", "40",
        "--eval-every", "15", "--eval-batches", "2", "--save-every", "1", "--keep-last", "2", "--sample-tokens", "3",
        "--device", "cpu", "--no-progress", "--seed", "7", "--log-every", "1"]


def final_weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / ckpt.WEIGHTS))


@pytest.mark.multiprocess
def test_sigkill_at_random_moments_then_resume_is_bit_identical(text_file, tmp_path):
    gptforge = [sys.executable, "-m", "gptforge", "train"]
    ref = tmp_path / "ref"
    subprocess.run([*gptforge, str(text_file), "--out", str(ref), *ARGS], check=True, capture_output=True,
                   timeout=300)

    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = resumes = 0
    cmd = [*gptforge, str(text_file), "--out", str(run), *ARGS]
    for _ in range(40):  # bounded: each round either gets killed or finishes
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kills < 4:
            # after start-up (imports, tokenizing: ~2-4 s) steps and checkpoint writes alternate quickly
            time.sleep(rng.uniform(2.0, 6.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                kills += 1
                if (run / "config.toml").exists():  # else it died before starting: start it again
                    cmd = [*gptforge, "--resume", str(run)]
                    resumes += 1
                continue
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        break
    assert kills >= 3, f"only {kills} kills landed; the run finished too fast"
    a, b = final_weights(ref), final_weights(run)
    mismatches = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"fault injection: {kills} kills, {resumes} resumes, {len(mismatches)} mismatched tensors")
    assert not mismatches

    def losses(run_dir):
        records = map(json.loads, open(run_dir / "metrics.jsonl"))
        return [(r["step"], r["train_loss"]) for r in records if r["event"] == "train"]

    assert losses(ref) == losses(run)  # the log reads as if the run had never been killed

"""Peak resident memory when gptforge loads each GPT-2 size from a Hugging Face safetensors directory.

    python benchmarks/load_rss.py                       # all four sizes (needs ~7 GB free disk in /tmp)
    python benchmarks/load_rss.py --sizes 124M 355M

For each size, a Hugging Face-format directory (config.json + model.safetensors, fp32, random
weights) is written to a temporary directory, then a fresh Python process imports gptforge, notes
its peak RSS, loads the model with `weights.load_any` (the path `eval`, `generate`, `convert` and
`train --init-from` use) and notes its peak RSS again. The directory is deleted before the next
size. Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # OpenAI's published names -> shape (REFERENCE.md)
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "355M": dict(n_embd=1024, n_layer=24, n_head=16),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20),
    "1558M": dict(n_embd=1600, n_layer=48, n_head=25),
}

MEASURE = """
import json, resource, sys, time
import torch
from gptforge.weights import load_any
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model, meta = load_any(sys.argv[1])
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = model.num_params()
print(json.dumps({"params": n, "weights_mb": n * 4 / 2**20, "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024,
                  "load_s": seconds}))
"""


def hf_shapes(C: int, L: int) -> dict[str, tuple[int, ...]]:
    shapes = {"transformer.wte.weight": (50257, C), "transformer.wpe.weight": (1024, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (C, 3 * C),
                       p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                       p + "ln_2.weight": (C,), p + "ln_2.bias": (C,), p + "mlp.c_fc.weight": (C, 4 * C),
                       p + "mlp.c_fc.bias": (4 * C,), p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def write_hf_dir(d: Path, shape: dict) -> None:
    """config.json + model.safetensors of a random fp32 GPT-2 of this shape, in Hugging Face's layout.

    safetensors' save_file needs every tensor in memory at once (and copies them), 13 GB for 1558M;
    this writes the same file format (8-byte header length, JSON header, raw little-endian data)
    one tensor at a time, and safetensors itself then checks the file.
    """
    import numpy as np
    from safetensors import safe_open

    from gptforge.models.gpt2 import GPTConfig
    from gptforge.weights import hf_config

    C, L = shape["n_embd"], shape["n_layer"]
    shapes = hf_shapes(C, L)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, s in shapes.items():
        n = 4 * int(np.prod(s))
        header[name] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, s in shapes.items():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                a = np.ones(s, dtype="<f4")
            else:
                a = (rng.standard_normal(s, dtype=np.float32) * 0.02).astype("<f4")
            f.write(a.tobytes())
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(shapes)
    cfg = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=C, n_heads=shape["n_head"], n_layers=L,
                    qkv_bias=True, tie_weights=True)
    (d / "config.json").write_text(json.dumps(hf_config(cfg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the model files are written")
    args = ap.parse_args()

    results = []
    print(f"{'size':>6} {'params':>14} {'file MB':>9} {'RSS before':>11} {'peak RSS':>9} {'peak - before':>14} "
          f"{'/ weights':>9} {'load s':>7}")
    for name in args.sizes:
        d = Path(tempfile.mkdtemp(prefix=f"gpt2-{name}-", dir=args.tmp))
        try:
            # written by a child process, so this process never holds a model
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import load_rss as b; b.write_hf_dir(__import__('pathlib').Path({str(d)!r}), "
                            f"b.SIZES[{name!r}])"], check=True)
            file_mb = (d / "model.safetensors").stat().st_size / 2**20
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", MEASURE, str(d)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(size=name, file_mb=file_mb, wall_s=time.perf_counter() - t0)
            r["overhead_ratio"] = (r["peak_rss_mb"] - r["rss_before_mb"]) / r["weights_mb"]
            results.append(r)
            print(f"{name:>6} {r['params']:>14,} {file_mb:>9.0f} {r['rss_before_mb']:>11.0f} {r['peak_rss_mb']:>9.0f} "
                  f"{r['peak_rss_mb'] - r['rss_before_mb']:>14.0f} {r['overhead_ratio']:>9.2f} {r['load_s']:>7.1f}",
                  flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    print(json.dumps({"benchmark": "load_rss", "results": results}))


if __name__ == "__main__":
    main()

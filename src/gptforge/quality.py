"""`gptforge bench quality`: how good a recipe's model gets in M minutes of training, in held-out bits per byte.

The text (DATA, or the built-in corpus) is cut once: the last --holdout of its characters, whole
documents from the end (or a paragraph-aligned cut of a single document), is the held-out text
every recipe is scored on, so runs with different tokenizers are scored on the same bytes. A
recipe (training/recipes.py) trains on the rest with a transformer of the same shape for every
recipe: --emb-dim, --n-layers and --context-length; a llama model gets the SwiGLU width that gives
its blocks the parameter count of GPT-2's blocks (matched_llama_shape). A short calibration run
times the recipe's steps (the median of 8); the run then gets as many steps as fit in --minutes of
training time (its schedule planned for that length), saving --points checkpoints on the way, each
scored afterwards on the held-out text: the final one and the best along the curve (a run that memorises its
text is best before its end) are both reported. Last line: JSON.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .config import ConfigError, check_fields, opt
from .data import default_documents, read_texts
from .devices import device_opt, pick_device
from .evaluate import EvalConfig, evaluate_text
from .models import block_params, build
from .perf import device_name
from .tokenizer import train_bpe
from .training import train
from .training.config import resolve_train_config
from .training.plan import TOKENIZER_VOCAB
from .training.recipes import RECIPES, get_recipe

CALIBRATION_STEPS = 8


@dataclass
class QualityConfig:
    """What `gptforge bench quality` trains and for how long."""

    recipe: str = opt("nanogpt", "The recipe to train (training/recipes.py): book, nanogpt, modern or modern-moe.",
                      choices=tuple(RECIPES))
    minutes: float = opt(5.0, "Minutes of training time (optimizer steps only; start-up and scoring not counted).",
                              low=0, above=True)
    emb_dim: int = opt(128, "Width of the model, the same for every recipe.", low=1)
    n_layers: int = opt(4, "Transformer blocks, the same for every recipe.", low=1)
    head_dim: int = opt(32, "Width of an attention head (heads = emb_dim / head_dim).", low=1)
    context_length: int = opt(128, "Tokens per training window.", low=1)
    batch_size: int = opt(8, "Windows per optimizer step.", low=1)
    tokenizer_vocab: int | None = opt(None, "Train a byte-level BPE tokenizer of this many ids on the training "
                                             "text first; default: the recipe's (GPT-2's for book and nanogpt, "
                                             "4096 ids for modern).", low=1)
    holdout: float = opt(0.1, "Share of the text's characters, from the end, held out for scoring.",
                              low=0, high=1, above=True, below=True)
    points: int = opt(5, "Checkpoints along the run scored on the held-out text (the curve of bpb over time).", low=1)
    out: str | None = opt(None, "Directory for the runs; default: a temporary one, deleted at the end.")
    seed: int = opt(123, "Seed of the runs.")
    device: str = device_opt()

    def __post_init__(self) -> None:
        check_fields(self)
        if self.emb_dim % self.head_dim:
            raise ConfigError(f"--emb-dim {self.emb_dim} must be a multiple of --head-dim {self.head_dim}")




def split_holdout(docs: list[str], holdout: float) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: whole documents from the end until `holdout` of the characters are
    held out (at least one each way); a single document is cut at a paragraph start near that point."""
    total = sum(map(len, docs))
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - holdout))
        para = text.find("\n\n", cut)
        if not 0 <= para < len(text) - 2:  # none after the point: the last paragraph start before it
            para = text.rfind("\n\n", 0, cut)
        cut = para + 2 if para >= 0 else cut
        if not 0 < cut < len(text):
            raise ConfigError(f"--holdout {holdout} leaves no training or no held-out text in {len(text)} characters")
        return [text[:cut]], [text[cut:]]
    held, n = 0, 0
    while n < len(docs) - 1 and (n == 0 or held < holdout * total):
        n += 1
        held += len(docs[-n])
    return docs[:-n], docs[-n:]


def write_documents(docs: list[str], directory: Path) -> str:
    """One file per document, in order (train and eval read a directory's files sorted by name)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"{i:06d}.txt").write_text(doc, encoding="utf-8")
    return str(directory)


def gpt2_block_params(emb_dim: int) -> int:
    """Weights of one GPT-2 block without biases and norms: q, k, v, out (4 C^2) and the 4C MLP (8 C^2)."""
    return 12 * emb_dim**2


def matched_llama_shape(emb_dim: int, head_dim: int) -> dict:
    """A llama block with GPT-2's block weights: full key/value heads (4 C^2 in attention) and a SwiGLU of
    width I with 3 C I = 8 C^2, so I = 8C/3 (rounded to a multiple of 8; the rest of a per cent off)."""
    return dict(n_heads=emb_dim // head_dim, n_kv_heads=emb_dim // head_dim, head_dim=head_dim,
                intermediate_size=8 * round(emb_dim / 3))


def run_flags(q: QualityConfig, recipe: dict, run_dir: Path, tokenizer: str | None, steps: int) -> dict:
    flags = dict(out=str(run_dir), emb_dim=q.emb_dim, n_layers=q.n_layers, context_length=q.context_length,
                 batch_size=q.batch_size, max_steps=steps, val_fraction=0.0, eval_every=10**9, eval_batches=1,
                 sample_tokens=0, progress=False, save_every=max(1, steps // q.points), keep_last=0, seed=q.seed,
                 device=q.device, logger=[])
    if recipe["arch"] == "llama":
        flags.update(matched_llama_shape(q.emb_dim, q.head_dim))
    else:
        flags["n_heads"] = q.emb_dim // q.head_dim
    if tokenizer is not None:
        flags["tokenizer"] = tokenizer
    return flags


def bench_quality(data: tuple[str, ...], q: QualityConfig, log=print) -> dict:
    """Train q.recipe for q.minutes on the training part of the text; returns the JSON result."""
    recipe = get_recipe(q.recipe)
    train_docs, held_docs = split_holdout(read_texts(data) if data else default_documents(), q.holdout)
    with tempfile.TemporaryDirectory(prefix="gptforge-quality-") as tmp:
        work = Path(q.out or tmp)
        if q.out and work.is_dir() and any(work.iterdir()):
            raise ConfigError(f"--out {work}: the directory is not empty; give a new or empty one")
        write_documents(train_docs, work / "train")
        write_documents(held_docs, work / "heldout")
        tokenizer = make_tokenizer(q, train_docs, work)
        log(f"quality: recipe {q.recipe}, {q.minutes:g} minutes; {len(train_docs)} training documents "
            f"({sum(map(len, train_docs)):,} characters), {len(held_docs)} held out "
            f"({sum(map(len, held_docs)):,}); tokenizer {tokenizer or 'gpt2'}")
        return measure(q, recipe, work, tokenizer, log)


def make_tokenizer(q: QualityConfig, train_docs: list[str], work: Path) -> str | None:
    """The path of a byte-level BPE trained on the training documents, or None for GPT-2's tokenizer."""
    vocab = q.tokenizer_vocab or TOKENIZER_VOCAB.get(q.recipe)  # the recipe's, as plan counts; else GPT-2's
    if vocab is None:
        return None
    path = work / f"tokenizer-{vocab}.json"
    path.write_text(train_bpe(train_docs, vocab).json, encoding="utf-8")
    return str(path)


def measure(q: QualityConfig, recipe: dict, work: Path, tokenizer: str | None, log) -> dict:
    inputs = (str(work / "train"),)
    calib_dir = work / f"{q.recipe}-calibration"
    cfg, run_dir = resolve_train_config(inputs, None, None, None,
                                        run_flags(q, recipe, calib_dir, tokenizer, CALIBRATION_STEPS), recipe=q.recipe)
    seconds = train(cfg, run_dir, log=lambda *a, **k: None)["median_step_seconds"]  # the first steps are slower
    steps = max(1, int(q.minutes * 60 / seconds))
    log(f"calibration: {seconds * 1000:.0f} ms per step -> {steps} steps in {q.minutes:g} minutes")
    cfg, run_dir = resolve_train_config(inputs, None, None, None,
                                        run_flags(q, recipe, work / q.recipe, tokenizer, steps), recipe=q.recipe)
    summary = train(cfg, run_dir, log=log)
    per_step = summary["train_seconds"] / summary["steps"]
    curve = []
    for point in ckpt.checkpoint_dirs(run_dir):
        step = int(point.name.split("-")[1])
        result = evaluate_text(str(point), [str(work / "heldout")],
                               EvalConfig(batch_size=q.batch_size, device=q.device))
        curve.append(dict(step=step, seconds=round(step * per_step, 2), val_loss=round(result.loss, 4),
                          val_bpb=round(result.bpb, 4)))
        log(f"step {step}: {step * per_step:.1f} s, held-out loss {result.loss:.4f}, bpb {result.bpb:.4f}")
    model = build(cfg.model)
    last, best = curve[-1], min(curve, key=lambda point: point["val_bpb"])  # the first lowest
    log(f"final held-out bpb {last['val_bpb']:.4f}; best {best['val_bpb']:.4f} at {best['seconds']:.1f} s "
        f"(step {best['step']})")
    out = {"recipe": q.recipe, "minutes": round(summary["train_seconds"] / 60, 3), "steps": summary["steps"],
           "tokens": summary["steps"] * q.batch_size * q.context_length, "val_loss": last["val_loss"],
           "val_bpb": last["val_bpb"], "best_val_bpb": best["val_bpb"], "best_seconds": best["seconds"],
           "best_step": best["step"], "device": device_name(pick_device(q.device)),
           "block_params": block_params(model),
           "params": sum(p.numel() for p in model.parameters()), "tokenizer": Path(tokenizer).name if tokenizer
           else "gpt2", "curve": curve}
    if not math.isfinite(out["val_bpb"]):
        raise ConfigError(f"recipe {q.recipe}: the held-out bpb is {out['val_bpb']}; lower the recipe's learning rate")
    log(json.dumps(out))
    return out

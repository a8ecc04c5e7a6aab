"""Recipes: named sets of training settings (data, not code), for `gptforge train --recipe` and
`gptforge bench quality --recipe`.

A recipe names a model family and a preset (the shape `train` uses unless --preset says another),
and settings of the model, data and training sections. Layering: a recipe sits just above the
defaults and the preset; a --config file and flags still win over it.

- book: chapter 5 of *Build a Large Language Model (From Scratch)*: the book's GPT-2 124M shape at
  256 positions (no q/k/v bias, untied head, dropout 0.1), PyTorch's default initialisation, AdamW
  with torch's default betas (0.9, 0.999) decaying every parameter, constant lr 4e-4 (no warmup),
  no clipping, batch 2, 10 epochs, evaluation every 5 steps over 5 batches; the text cut at 90% of its
  characters, each side tokenized on its own. Step for step the book's run (benchmarks/book_side_by_side.py);
  its data order and dropout masks are drawn from gptforge's seeded streams instead of the global RNG.
- nanogpt: nanoGPT's train.py: GPT-2 init and tied head, no dropout, AdamW (0.9, 0.95) with weight
  decay 0.1 on matrices, warmup + cosine to lr / 10, clipping 1.0.
- modern: the llama family (rotary, RMSNorm, SwiGLU, QK-norm), Muon for the hidden matrices and
  AdamW for the rest, warmup-stable-decay, attention kept inside documents.
- modern-moe: modern with each MLP a mixture of 4 experts of the MLP's width, top-1 (minimind-3-moe's router
  and load-balancing loss): as many active weights per token as modern, 4 times the MLP weights.
"""

from __future__ import annotations

from ..config import ConfigError

RECIPES: dict[str, dict] = {
    "book": dict(
        arch="gpt2", preset="gpt2-small", context_length=256, qkv_bias=False, tie_weights=False, drop_rate=0.1,
        init="torch", lr=4e-4, weight_decay=0.1, weight_decay_on="all", beta1=0.9, beta2=0.999,
        schedule="constant", warmup_steps=0, grad_clip=0.0, epochs=10, batch_size=2, eval_every=5,
        eval_batches=5, val_fraction=0.1, val_split="characters", sampling="shuffle",
        sample_prompt="Every effort moves you", sample_tokens=25,
    ),
    "nanogpt": dict(
        arch="gpt2", preset="mini", drop_rate=0.0, tie_weights=True, init="gpt2", optimizer="adamw", lr=1e-3,
        weight_decay=0.1, weight_decay_on="matrices", beta1=0.9, beta2=0.95, schedule="cosine", grad_clip=1.0,
    ),
    "modern": dict(
        arch="llama", preset="llama-mini", drop_rate=0.0, qk_norm=True, tie_weights=True, init="gpt2",
        optimizer="muon", lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.0, schedule="wsd", decay_fraction=0.3,
        grad_clip=1.0, document_mask=True,
    ),
    "modern-moe": dict(
        arch="llama", preset="llama-mini", drop_rate=0.0, qk_norm=True, tie_weights=True, init="gpt2",
        optimizer="muon", lr=3e-3, beta1=0.9, beta2=0.95, weight_decay=0.0, schedule="wsd", decay_fraction=0.3,
        grad_clip=1.0, document_mask=True, n_experts=4, experts_per_token=1, router_aux_loss_coef=5e-4,
    ),
}


def get_recipe(name: str) -> dict:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None

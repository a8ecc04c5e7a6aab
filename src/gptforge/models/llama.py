"""The Llama/Qwen family: RMSNorm, rotary positions, grouped-query attention, SwiGLU; and nothing else.

One config covers Llama 2/3 (no QK-norm), Qwen2 (a q/k/v bias) and Qwen3 and minimind (RMSNorm of
each query and key head, ``qk_norm``). Parameter names follow Hugging Face's ``LlamaForCausalLM``
without its ``model.`` prefix (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``layers.{i}.mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``), which are also minimind's
names, so loading either is a key map. Positions are rotary: nothing is learned per position, so a
sequence may run past context_length (the length the model trains at) when generating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import check_fields, flag
from ..errors import ConfigError
from .decoder import Decoder
from .layers import (
    GroupedQueryAttention,
    RMSNorm,
    SavedConfig,
    SwiGLU,
    padded_rows,
    rotary_tables,
    vocab_padding_hooks,
)
from .moe import BALANCES, MoE


def swiglu_hidden(emb_dim: int) -> int:
    """The default SwiGLU width: 8/3 of emb_dim (as many weights as a 4x GELU MLP), rounded up to a multiple of 64."""
    return 64 * ((int(emb_dim * 8 / 3) + 63) // 64)


@dataclass
class LlamaConfig(SavedConfig):
    """Shape of a Llama/Qwen3-style model. The defaults are the CPU-sized "llama-mini" preset."""

    vocab_size: int = field(default=50257, metadata={"help": "Number of token ids.", "low": 1})
    context_length: int = field(
        default=128, metadata={"help": "Sequence length the model trains at (rotary positions: no table to outgrow).",
                               "low": 1}
    )
    emb_dim: int = field(default=128, metadata={"help": "Width of the residual stream.", "low": 1})
    n_heads: int = field(default=4, metadata={"help": "Query heads per layer.", "low": 1})
    n_kv_heads: int | None = field(
        default=None, metadata={"help": "Key/value heads per layer (grouped-query attention; 1 is multi-query); "
                                        "must divide --n-heads. Default: --n-heads.", "low": 1})
    head_dim: int | None = field(default=None, metadata={"help": "Width of each head; default: emb_dim / n_heads.",
                                                         "low": 1})
    n_layers: int = field(default=4, metadata={"help": "Number of transformer blocks.", "low": 1})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "Width of the SwiGLU MLP; default: 8/3 of emb_dim rounded up to a multiple "
                                        "of 64 (Llama's rule, and MiniMind2's).", "low": 1})
    norm_eps: float = field(default=1e-6, metadata={"help": "Epsilon of every RMSNorm.", "low": 0, "above": True})
    rope_theta: float = field(default=1e6, metadata={"help": "Base of the rotary embedding frequencies.",
                                                     "low": 1, "above": True})
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm on each query and key head (Qwen3, minimind)."})
    qkv_bias: bool = field(default=False, metadata={"help": "Bias on the query/key/value projections (Qwen2)."})
    tie_weights: bool = field(default=True, metadata={"help": "Share the output head with the token embedding."})
    drop_rate: float = field(default=0.0, metadata={"help": "Dropout on attention and residual branches in training.",
                                                    "low": 0, "high": 1, "below": True})
    pad_vocab: bool = field(
        default=False,
        metadata={"help": "Pad the embedding and output head to a multiple of 64 rows for faster matmuls; "
                          "the padding never shows in logits, losses, samples or saved weights."},
    )
    n_experts: int = field(default=0, metadata={"help": "Experts of each mixture-of-experts feed-forward layer "
                                                        "(0: a dense SwiGLU MLP).", "low": 0})
    experts_per_token: int = field(default=1, metadata={"help": "Experts each token is routed to (top-k).",
                                                          "low": 1})
    moe_intermediate_size: int | None = field(
        default=None, metadata={"help": "Width of each expert's SwiGLU; default: --intermediate-size (minimind).",
                                "low": 1})
    norm_topk_prob: bool = field(default=True, metadata={"help": "Renormalise the chosen experts' router "
                                                                 "probabilities to sum to 1 (minimind; Qwen3-MoE's "
                                                                 "config says per model)."})
    router_aux_loss_coef: float = field(default=5e-4, metadata={"help": "Weight of minimind's load-balancing loss "
                                                                        "in the training loss (--router-balance aux).",
                                                                "low": 0})
    router_balance: str = field(
        default="aux", metadata={"help": "How experts are kept evenly loaded: aux (a load-balancing loss) or bias "
                                         "(DeepSeek-V3's per-expert routing bias, moved after each step by "
                                         "--router-bias-speed towards equal load; no loss).", "choices": BALANCES})
    router_bias_speed: float = field(default=1e-3, metadata={"help": "How far each expert's routing bias moves per "
                                                                     "optimizer step (--router-balance bias).",
                                                             "low": 0})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_heads", "head_dim", "n_layers",
                     "intermediate_size", "experts_per_token", "moe_intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{flag(name)} must be a whole number, got {value!r}")
        check_fields(self)
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"--n-kv-heads {self.n_kv_heads} must divide --n-heads {self.n_heads} (each key/value "
                             "head serves a whole group of query heads); change one of them")
        if self.head_dim is None and self.emb_dim % self.n_heads:
            raise ConfigError(f"--emb-dim {self.emb_dim} must be divisible by --n-heads {self.n_heads}, "
                             "or give --head-dim")
        if self.head_dim is not None and self.head_dim % 2:
            raise ConfigError(f"--head-dim {self.head_dim} must be even (rotary embeddings turn pairs of dimensions)")
        if self.head_dim is None and (self.emb_dim // self.n_heads) % 2:
            raise ConfigError(f"--emb-dim {self.emb_dim} / --n-heads {self.n_heads} gives odd heads of "
                             f"{self.emb_dim // self.n_heads}; rotary embeddings need even ones (give --head-dim)")
        # the defaults resolved, so that a saved config says what the model is
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.emb_dim // self.n_heads
        self.intermediate_size = self.intermediate_size or swiglu_hidden(self.emb_dim)
        self._check_experts()

    def _check_experts(self) -> None:
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool):
            raise ConfigError(f"--n-experts must be a whole number, got {self.n_experts!r}")
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise ConfigError(f"--experts-per-token {self.experts_per_token} must be at most --n-experts "
                              f"{self.n_experts} (each token goes to that many different experts)")
        if self.n_experts:
            self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size



# minimind's published shapes (jingyaogong/minimind: model/model_minimind.py, its README's table and
# pretraining scripts: minimind-3 trains at 340 tokens, MiniMind2 at 512; minimind-3's MLP is
# ceil(768·π/64)·64 wide, MiniMind2's 8/3 of its width), and small ones that train on a laptop CPU.
# In `train`, vocab_size follows the run's tokenizer unless --vocab-size is given.
PRESETS: dict[str, dict] = {
    "minimind-3": dict(vocab_size=6400, context_length=340, emb_dim=768, n_layers=8, n_heads=8, n_kv_heads=4,
                       intermediate_size=2432, rope_theta=1e6, norm_eps=1e-6, qk_norm=True),
    "minimind2-small": dict(vocab_size=6400, context_length=512, emb_dim=512, n_layers=8, n_heads=8, n_kv_heads=2,
                            intermediate_size=1408, rope_theta=1e6, norm_eps=1e-5),
    "minimind2": dict(vocab_size=6400, context_length=512, emb_dim=768, n_layers=16, n_heads=8, n_kv_heads=2,
                      intermediate_size=2048, rope_theta=1e6, norm_eps=1e-5),
    "minimind-3-moe": dict(vocab_size=6400, context_length=340, emb_dim=768, n_layers=8, n_heads=8, n_kv_heads=4,
                           intermediate_size=2432, rope_theta=1e6, norm_eps=1e-6, qk_norm=True, n_experts=4,
                           experts_per_token=1, norm_topk_prob=True, router_aux_loss_coef=5e-4),
    "llama-tiny": dict(context_length=64, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=192),
    "llama-mini": dict(context_length=128, emb_dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=384),
}


class Block(nn.Module):
    """Pre-norm block: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.self_attn = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                               qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                                               drop_rate=cfg.drop_rate)
        self.post_attention_layernorm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        if cfg.n_experts:
            self.mlp = MoE(cfg.emb_dim, cfg.moe_intermediate_size, cfg.n_experts, cfg.experts_per_token,
                           norm_topk_prob=cfg.norm_topk_prob, aux_loss_coef=cfg.router_aux_loss_coef,
                           balance=cfg.router_balance, bias_speed=cfg.router_bias_speed, drop_rate=cfg.drop_rate)
        else:
            self.mlp = SwiGLU(cfg.emb_dim, cfg.intermediate_size, cfg.drop_rate)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(Decoder):
    """Llama/Qwen3: rotary positions, pre-RMSNorm blocks, grouped-query attention, SwiGLU or a mixture of experts
    (Hugging Face's names without `model.`: embed_tokens, layers, norm)."""

    EMBEDDING, BLOCKS, NORM = "embed_tokens", "layers", "norm"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = "auto"  # the kernel of packed documents (layers.ATTENTIONS): a runtime choice, not saved
        self.padded_vocab = padded_rows(cfg.vocab_size, cfg.pad_vocab)
        self.embed_tokens = nn.Embedding(self.padded_vocab, cfg.emb_dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, self.padded_vocab, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # projections into the residual stream: std / sqrt(2L)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        vocab_padding_hooks(self, ("embed_tokens.weight", "lm_head.weight"), cfg.vocab_size, self.padded_vocab)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor, masked: bool) -> tuple[torch.Tensor, dict]:
        """Token embeddings; every block takes the rotary tables of the positions: (T, hs), or (B, 1, T, hs)."""
        cos, sin = rotary_tables(pos, self.cfg.head_dim, self.cfg.rope_theta, self.embed_tokens.weight.dtype)
        rope = (cos[:, None], sin[:, None]) if masked else (cos, sin)
        return self.embed_tokens(idx), {"rope": rope}

    def extra_loss(self) -> torch.Tensor | None:
        """The sum over layers of the mixture-of-experts load-balancing losses of the last forward in training
        (minimind's reduction), or None: a dense model, evaluation, or --router-balance bias."""
        if not (self.training and self.cfg.n_experts and self.cfg.router_balance == "aux"):
            return None
        return sum(block.mlp.aux for block in self.layers)

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Distinct parameters (no position embeddings to leave out: non_embedding changes nothing); active: those
        one token runs through (experts_per_token of each layer's experts)."""
        n = super().num_params()
        if active and self.cfg.n_experts:
            idle = self.cfg.n_experts - self.cfg.experts_per_token
            n -= idle * self.cfg.n_layers * 3 * self.cfg.emb_dim * self.cfg.moe_intermediate_size
        return n


def blocks(model: Llama) -> nn.ModuleList:
    """The transformer blocks, in order (FSDP shards each one)."""
    return model.layers


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights of every matrix multiply one token runs through: q, k, v and o projections, the three SwiGLU
    matrices (of each of the experts_per_token experts, and the router, in a mixture of experts), the LM head."""
    attn = cfg.emb_dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # q and o: nh heads; k and v: nkv
    if cfg.n_experts:
        mlp = cfg.experts_per_token * 3 * cfg.emb_dim * cfg.moe_intermediate_size + cfg.n_experts * cfg.emb_dim
    else:
        mlp = 3 * cfg.emb_dim * cfg.intermediate_size
    return cfg.n_layers * (attn + mlp) + cfg.vocab_size * cfg.emb_dim


def flops_per_token(cfg: LlamaConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token: 6 x the matmul weights it runs through (a mixture of experts:
    the active ones) + 12·L·H·Q·T for attention with H query heads of width Q (PaLM, appendix B)."""
    T = seq_len or cfg.context_length
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T

"""The frame both families share: token ids -> embeddings -> blocks -> final norm -> logits or a loss.

A family (gpt2.py, llama.py) subclasses Decoder, builds its modules under its own parameter names (named by
EMBEDDING, BLOCKS and NORM, so checkpoints keep Hugging Face's names) and writes only what differs:
`embed` (token ids and positions -> the residual stream, and what each block takes besides it: rotary tables,
or nothing), and where it needs to, `check_length` (a table of learned positions ends at the context) and
`extra_loss` (a mixture of experts' load-balancing loss). The KV cache, packed documents, free layouts, the
padded vocabulary rows, the tied head and the parameter count are here, once.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import KVCache, cross_entropy, document_positions, packed_mask


class Decoder(nn.Module):
    """A decoder-only transformer's forward, written once. Subclasses set cfg, padded_vocab, lm_head, attention
    (the kernel of packed documents, layers.ATTENTIONS) and the modules EMBEDDING, BLOCKS and NORM name."""

    EMBEDDING = "embed_tokens"  # the token embedding's attribute name
    BLOCKS = "layers"  # the nn.ModuleList of transformer blocks
    NORM = "norm"  # the final norm

    @property
    def token_embedding(self) -> nn.Embedding:
        return getattr(self, self.EMBEDDING)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor, masked: bool) -> tuple[torch.Tensor, dict]:
        """Token ids (B, T) at positions pos ((T,), or (B, T) when masked: a packed or laid-out batch) -> the
        residual stream (B, T, C) and what every block takes besides it, by the block's argument names (the
        first of its arguments after x, in order: a cached step passes them by position)."""
        raise NotImplementedError

    def check_length(self, length: int, layout: tuple | None) -> None:
        """Refuse a sequence the model cannot read (nothing by default: rotary positions have no end)."""

    def extra_loss(self) -> torch.Tensor | None:
        """A loss added to the language-modelling loss in training (None: none)."""
        return None

    def tie(self) -> None:
        """Share the head with the embedding again (after parameters were assigned one by one)."""
        if self.cfg.tie_weights:
            self.lm_head.weight = self.token_embedding.weight

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *, targets: torch.Tensor | None = None,
                loss=cross_entropy, segments: torch.Tensor | None = None,
                layout: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size); with targets (B, T), loss(hidden, head weight, targets,
        vocab_size) (evaluate.lm_loss picks the kernel). With a cache, idx continues the cached positions, and
        their keys and values are added to it. With segments (B, T), the document number of each token (packed
        documents), positions restart at each document and attention stays inside it. A layout (positions (B, T),
        attention mask (B, 1, T, T), True: attend) places the tokens freely (evaluate.loglikelihood: a context and
        the continuations that share it in one row)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        self.check_length(start + T, layout)
        pos, mask = torch.arange(start, start + T, device=idx.device), None
        if segments is not None:
            drop = self.cfg.drop_rate if self.training else 0.0
            layout = document_positions(segments), packed_mask(segments, self.attention, drop)
        if layout is not None:
            assert cache is None, "packed rows are whole sequences: no KV cache"
            pos, mask = layout
        x, extra = self.embed(idx, pos, mask is not None)
        for i, block in enumerate(getattr(self, self.BLOCKS)):
            x = block(x, *extra.values(), cache.layer(i), start) if cache is not None else \
                block(x, **extra, mask=mask)  # by name: activation checkpointing tells a cached step by position
        if cache is not None:
            cache.advance(T)
        x = getattr(self, self.NORM)(x)
        if targets is not None:
            out = loss(x, self.lm_head.weight, targets, self.cfg.vocab_size)
            extra_loss = self.extra_loss()
            return out if extra_loss is None else out + extra_loss
        logits = self.lm_head(x)  # (B, T, padded_vocab)
        return logits[..., : self.cfg.vocab_size] if self.padded_vocab != self.cfg.vocab_size else logits

    def num_params(self) -> int:
        """Distinct parameters, the padded vocabulary rows left out."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields tied tensors once
        return n - (self.padded_vocab - self.cfg.vocab_size) * self.cfg.emb_dim * (1 if self.cfg.tie_weights else 2)

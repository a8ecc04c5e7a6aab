"""The data settings every run reads (DataConfig), the data error, and the names shared by the data modules."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_fields, opt
from ..errors import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
SAMPLING = ("shuffle", "random", "sequential")
PACKING = ("concat", "pad")
SPLITS = ("train", "val")
VAL_SPLITS = ("tokens", "characters")  # DataConfig.val_split
MANIFEST = "manifest.json"  # a prepared directory (gptforge prepare): see read_manifest
STATE = "prepare-state.json"  # an unfinished one
SHARDS_FORMAT = "gptforge-shards"
SHARDS_VERSION = 1


@dataclass
class DataConfig:
    """How text becomes training windows."""

    val_fraction: float = opt(0.1, "Share of the tokens, taken from the end, held out for validation.",
                                   low=0, high=1, below=True)
    val_split: str = opt("tokens", "How --val-fraction cuts text: tokens (the last share of the tokens) or characters "
                                   "(the last share of the characters, each side tokenized on its own, as the "
                                   "book's chapter 5 cuts its story).", choices=VAL_SPLITS)
    stride: int | None = opt(None, "Step between window starts; default: the context length (no overlap).",
                                   low=1, says='a positive integer')
    tokenizer: str = opt("gpt2", "Tokenizer: gpt2 (OpenAI's GPT-2 BPE, offline), or the path of a Hugging Face "
                                 "tokenizer.json (or its directory); default for a prepared DATA_DIR: its own.")
    tokenizer_vocab: int | None = opt(None, "Instead of --tokenizer: train a byte-level BPE of this many ids (with "
                                            "<|endoftext|>) on the run's training text when the run starts; it is "
                                            "kept as RUN_DIR/tokenizer.json, which --resume reuses. Text DATA only "
                                            "(a prepared DATA_DIR has its tokenizer).")
    sampling: str | None = opt(None, "Training windows: shuffle (windows at the stride, shuffled each epoch), "
                                     "random (any token offset, as nanoGPT) or sequential; default: random for a "
                                     "prepared DATA_DIR, shuffle for text.", choices=SAMPLING)
    document_mask: bool = opt(False, "Inside a packed window, attention stays within each document (they start at "
                                     "the end-of-text tokens) and positions restart at each: as if each ran alone.")
    packing: str = opt("concat", "How documents fill the training rows: concat (one stream cut into windows) or "
                                 "pad (one document per row, BOS + tokens + EOS, truncated to the context length and "
                                 "padded; padding is not scored: minimind's PretrainDataset).", choices=PACKING)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tokenizer_vocab is not None and self.tokenizer_vocab < 257:
            raise ConfigError(f"--tokenizer-vocab {self.tokenizer_vocab} is too small: a byte-level BPE needs at "
                             "least 257 ids (256 bytes and <|endoftext|>)")
        if self.packing == "pad" and self.document_mask:
            raise ConfigError("--document-mask is for packed windows; --packing pad holds one document per row "
                             "already: give only one of them")
        if self.packing == "pad" and self.sampling == "random":
            raise ConfigError("--sampling random draws windows at any token offset; --packing pad has one row per "
                             "document: use --sampling shuffle or sequential")
        if self.packing == "pad" and self.stride is not None:
            raise ConfigError("--stride steps windows through the token stream; --packing pad has one row per "
                             "document: leave --stride out")



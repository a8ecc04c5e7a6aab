"""Text -> token ids -> train/val split -> windows of context_length tokens -> batches; and prepared token shards.

Tokens are stored once, as one flat array per split; a window is a start offset into it, never a tensor of its
own. Batches are gathered from those offsets in a seeded order per epoch, so the position in the data is two
integers (epoch, batch) that a checkpoint can hold.

- config.py: DataConfig (the data settings of a run), DataError, the names the modules share;
- text.py: finding and reading text files, the built-in corpus, tokenizing, the train/val split;
- windows.py: windows, batches and samplers, padded documents, document boundaries;
- shards.py: the prepared-data format (manifest, reader and writer) and which tokens a run or eval reads;
- sources.py: what `gptforge prepare` reads (compressed files, JSON Lines, Parquet, Hugging Face datasets);
- workers.py: prepare's worker processes (records -> token ids);
- prepare.py: `gptforge prepare` itself (the pool, the shards, the resume state, the report).

Imports run one way: config <- text <- shards <- windows, sources <- workers <- prepare.
"""

from ..errors import DataError
from ..ops import IGNORE_INDEX
from .config import SAMPLING, TEXT_SUFFIXES, DataConfig
from .shards import (
    ShardedTokens,
    check_manifest,
    data_defaults,
    eval_tokens,
    open_prepared,
    prepared_dir,
    read_manifest,
    tokens_digest,
)
from .text import (
    default_corpus,
    default_documents,
    find_text_files,
    read_texts,
    split_texts,
    split_tokens,
    text_splits,
    tokenize_documents,
)
from .windows import (
    Batches,
    PaddedDocuments,
    RandomBatches,
    TokenWindows,
    check_windows,
    document_eot,
    document_spans,
    make_windows,
    pad_ids,
    training_batches,
)

__all__ = [
    "IGNORE_INDEX", "SAMPLING", "TEXT_SUFFIXES", "Batches", "DataConfig", "DataError", "PaddedDocuments",
    "RandomBatches", "ShardedTokens", "TokenWindows", "check_manifest", "check_windows", "data_defaults",
    "default_corpus", "default_documents", "document_eot", "document_spans", "eval_tokens", "find_text_files",
    "make_windows", "open_prepared", "pad_ids", "prepared_dir", "read_manifest", "read_texts", "split_texts",
    "split_tokens", "text_splits", "tokenize_documents", "tokens_digest", "training_batches",
]

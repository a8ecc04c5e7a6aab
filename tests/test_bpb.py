"""Bits per byte: the tokenizers' byte tables and evaluate's bpb, each against a computation by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from minimind_like import tokenizer_dir
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models

from gptforge import ops
from gptforge.config import ConfigError
from gptforge.data import Batches, TokenWindows, tokenize_documents
from gptforge.evaluate import IGNORE, EvalResult, byte_table, evaluate
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.tokenizer import GPT2Tokenizer, HFTokenizer, train_bpe

MINIMIND = tokenizer_dir()  # minimind_like.py
DOCUMENTS = [  # non-ASCII throughout: bytes differ from characters and from tokens
    "The naïve café served crème brûlée — twice. 東京 and Zürich are far apart; ¿por qué? Ça va. "
    "Emoji 🤖 and 日本語のテキスト, Ελληνικά too.",
    "A second document: naïve café — 東京 again, then «quotes», ½ a cup" + " and so on" * 12,
]  # an ASCII tail longer than a window: the last whole window ends between characters
CONTEXT = 16


def tiny_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=CONTEXT, emb_dim=32, n_heads=2, n_layers=2,
                         drop_rate=0.0)).eval()


@torch.no_grad()
def bpb_by_hand(model: GPT, tokens: np.ndarray, span_bytes) -> float:
    """Per-token F.cross_entropy over every window (stride = context), summed, in bits, divided by the bytes
    of the scored span (tokens[1 : n * CONTEXT + 1], contiguous) as span_bytes counts them."""
    n = (len(tokens) - 1) // CONTEXT
    ids = torch.as_tensor(tokens[: n * CONTEXT + 1].astype(np.int64))
    x, y = ids[:-1].view(n, CONTEXT), ids[1:].view(n, CONTEXT)
    nats = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").sum().item()
    return nats / math.log(2) / span_bytes(ids[1:].tolist())


def text_bytes(tokenizer, special: set[int]):
    """Bytes of a span: the text of each run between special tokens, decoded as one piece, UTF-8 encoded;
    the special tokens themselves are markers, 0 bytes."""
    def count(span: list[int]) -> int:
        pieces, piece = [], []
        for i in span + [-1]:
            if i in special or i == -1:
                pieces.append(piece)
                piece = []
            else:
                piece.append(i)
        texts = [tokenizer.decode(p) for p in pieces if p]
        assert all("\ufffd" not in t for t in texts)  # no piece starts or ends inside a character
        return sum(len(t.encode("utf-8")) for t in texts)
    return count


def bpb_of(model: GPT, tokenizer, tokens: np.ndarray) -> EvalResult:
    batches = Batches(TokenWindows(tokens, CONTEXT), 3, shuffle=False, drop_last=False)  # a partial last batch
    return evaluate(model, batches, token_bytes=tokenizer.token_bytes())


def test_gpt2_bpb_equals_the_hand_computation(tiktoken_gpt2):
    tok = GPT2Tokenizer()
    tokens = tokenize_documents(DOCUMENTS, tok)
    assert tok.eot_id in tokens[1:]  # the separator is scored: its loss counts, its bytes do not
    model = tiny_model(tok.vocab_size)
    result = bpb_of(model, tok, tokens)

    def reference(span):  # tiktoken's own gpt2 encoding, bytes without the end-of-text token
        return len(tiktoken_gpt2.decode_bytes([i for i in span if i != tok.eot_id]))

    assert result.bytes == reference(tokens[1: result.tokens + 1].tolist()) == \
        text_bytes(tok, {tok.eot_id})(tokens[1: result.tokens + 1].tolist())
    assert result.bytes > result.tokens and result.bytes > len("".join(DOCUMENTS))  # multi-byte characters
    assert result.bpb == pytest.approx(bpb_by_hand(model, tokens, reference), rel=1e-5)
    assert result.bpb == pytest.approx(result.loss * result.tokens / math.log(2) / result.bytes)


@pytest.mark.parametrize("which", ["trained", "minimind"])
def test_byte_level_bpe_bpb_equals_the_hand_computation(which):
    if which == "trained":
        tok = train_bpe(DOCUMENTS * 3 + ["naïve café", "東京 東京", "the end the end"], vocab_size=300)
    else:
        tok = HFTokenizer.from_file(MINIMIND)  # eos <|im_end|>, 36 added tokens
    special = {i for i, t in tok._tok.get_added_tokens_decoder().items() if t.special}
    tokens = tokenize_documents(DOCUMENTS, tok)
    assert tok.eot_id in special and tok.eot_id in tokens[1:]
    model = tiny_model(tok.vocab_size)
    result = bpb_of(model, tok, tokens)
    assert result.bytes == text_bytes(tok, special)(tokens[1: result.tokens + 1].tolist())
    assert result.bpb == pytest.approx(bpb_by_hand(model, tokens, text_bytes(tok, special)), rel=1e-5)


@pytest.mark.parametrize("which", ["trained", "minimind"])
def test_byte_table_matches_each_tokens_own_decoding(which):
    tok = (train_bpe(DOCUMENTS * 3, vocab_size=300) if which == "trained" else HFTokenizer.from_file(MINIMIND))
    table, added = tok.token_bytes(), tok._tok.get_added_tokens_decoder()
    assert table.shape == (tok.vocab_size,) and tok.token_bytes() is table  # computed once
    checked = 0
    for i in range(tok.vocab_size):
        if i in added and added[i].special:
            assert table[i] == 0
            continue
        text = tok.decode([i])
        if "\ufffd" not in text:  # a token that is a whole character sequence (others hold part of one)
            assert table[i] == len(text.encode("utf-8")), (i, text)
            checked += 1
    assert checked > 0.5 * tok.vocab_size
    if which == "minimind":
        assert table[tok.encode("<think>")[0]] == len("<think>")  # a non-special added token is its text


def test_gpt2_byte_table_is_tiktokens_token_bytes(tiktoken_gpt2):
    table = GPT2Tokenizer().token_bytes()
    assert table.shape == (50257,) and table[50256] == 0
    for i in (0, 220, 6109, 17312, 50255):
        assert table[i] == len(tiktoken_gpt2.decode_single_token_bytes(i))
    assert table[:256].sum() == 256  # the 256 single bytes come first


def test_ignored_targets_are_not_scored(monkeypatch):
    # the fused CPU head + loss kernel takes no -100 targets yet (loss masking adds that): the plain path here
    monkeypatch.setattr(ops, "use_cpu_kernels", lambda x: False)
    model = tiny_model(101)
    table = np.arange(90) % 4 + 1  # ids 90..100 lie past the tokenizer: 0 bytes
    torch.manual_seed(1)
    x, y = torch.randint(0, 101, (2, CONTEXT)), torch.randint(0, 101, (2, CONTEXT))
    y[0, :5], y[1, 10:] = IGNORE, IGNORE
    y[1, 0] = 95
    scored = y != IGNORE
    with torch.no_grad():
        nats = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE)
    expected_bytes = sum(int(table[t]) for t in y[scored].tolist() if t < len(table))

    result = evaluate(model, [(x, y)], token_bytes=table)
    assert result.tokens == scored.sum().item() == 2 * CONTEXT - 5 - 6
    assert result.loss == pytest.approx(nats.sum().item() / result.tokens, rel=1e-6)
    assert result.bytes == expected_bytes
    assert result.bpb == pytest.approx(nats.sum().item() / math.log(2) / expected_bytes, rel=1e-6)
    padding = (x, torch.full_like(y, IGNORE))  # a batch with nothing to score changes nothing
    assert evaluate(model, [padding, (x, y), padding], token_bytes=table) == result
    with pytest.raises(ValueError, match="no complete window with a scored target"):
        evaluate(model, [padding], token_bytes=table)


def test_bpb_is_none_without_a_table_or_without_text():
    model = tiny_model(101)
    x = torch.randint(0, 101, (2, CONTEXT))
    y = torch.full((2, CONTEXT), 100)
    plain = evaluate(model, [(x, y)])
    assert plain.bytes is None and plain.bpb is None and math.isfinite(plain.loss)
    table = np.ones(101, dtype=np.int64)
    table[100] = 0  # a special token: only it is scored, so no text was scored
    special_only = evaluate(model, [(x, y)], token_bytes=table)
    assert special_only.bytes == 0 and special_only.bpb is None and special_only.loss == plain.loss


def test_other_decoders_are_refused_clearly():
    raw = RawTokenizer(models.BPE(vocab={"▁a": 0, "<0x41>": 1}, merges=[]))
    raw.decoder = decoders.Metaspace()
    tok = HFTokenizer(raw.to_str(), source="llama/tokenizer.json")
    with pytest.raises(ConfigError, match=r"llama/tokenizer.json: bits per byte needs a byte-level BPE tokenizer "
                                          r"\(decoder ByteLevel\); this one's decoder is Metaspace"):
        tok.token_bytes()
    warnings = []
    assert byte_table(tok, warnings.append) is None
    assert warnings == ["gptforge: warning: bits per byte not reported: llama/tokenizer.json: bits per byte needs "
                        "a byte-level BPE tokenizer (decoder ByteLevel); this one's decoder is Metaspace"]

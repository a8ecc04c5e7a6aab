"""--packing pad: one document per row as minimind's PretrainDataset builds it (checked against a straight
re-implementation of it with transformers' tokenizer), padding excluded from the loss (the fused CPU kernel
included), from evaluation and from the token count."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clirun import run
from minimind_like import tokenizer_dir
from test_train import tiny_run

from gptforge import ops
from gptforge.config import ConfigError, build
from gptforge.data import (
    IGNORE_INDEX,
    DataConfig,
    PaddedDocuments,
    ShardedTokens,
    document_spans,
    make_windows,
    pad_ids,
    tokenize_documents,
)
from gptforge.evaluate import evaluate, loss_batch
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.tokenizer import get_tokenizer, tokenizer_from_metadata, tokenizer_metadata
from gptforge.training import train
from gptforge.training.state import build_data

MINIMIND = tokenizer_dir()  # minimind_like.py: a tokenizer with the properties of minimind's
TEXTS = ["今天我们在河边看到了鳄鱼和麒麟。", "古代传说中有一种猛兽叫饕餮，" * 12, "Hello world, 深度学习 models learn.",
         "机器学习是人工智能的一个分支。", "a"]


def minimind_rows(texts, tokenizer, max_length):
    """minimind's PretrainDataset.__getitem__ (dataset/lm_dataset.py), then the shift its model applies:
    inputs input_ids[:-1], targets labels[1:]."""
    xs, ys = [], []
    for text in texts:
        tokens = tokenizer(str(text), add_special_tokens=False, max_length=max_length - 2, truncation=True).input_ids
        tokens = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id]
        input_ids = tokens + [tokenizer.pad_token_id] * (max_length - len(tokens))
        input_ids = torch.tensor(input_ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[input_ids == tokenizer.pad_token_id] = -100
        xs.append(input_ids[:-1])
        ys.append(labels[1:])
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("context_length", [8, 40])
def test_pad_rows_equal_minimind_pretrain_dataset(context_length):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(MINIMIND))
    tok = get_tokenizer(str(MINIMIND))
    assert pad_ids(tok) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    rows = make_windows(tokenize_documents(TEXTS, tok), context_length, DataConfig(packing="pad"), tok)
    assert isinstance(rows, PaddedDocuments) and len(rows) == len(TEXTS)
    x, y = rows.batch(np.arange(len(TEXTS)))
    want_x, want_y = minimind_rows(TEXTS, hf, context_length + 1)
    assert x.shape == (len(TEXTS), context_length)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_bos_travels_with_the_tokenizer():
    tok = get_tokenizer(str(MINIMIND))
    assert tok.bos_id == 1 and tok.config()["bos_token"] == "<|im_start|>"
    assert tokenizer_from_metadata(tokenizer_metadata(tok)).bos_id == 1


def test_padding_is_masked_exactly_gpt2():
    """GPT-2 has one special token: <|endoftext|> is BOS, EOS and padding; -100 exactly at the padding."""
    tok = get_tokenizer("gpt2")
    texts = ["Hello there, world.", "One two three four five six seven eight nine ten eleven twelve.", "x"]
    docs = [tok.encode(t) for t in texts]
    rows = make_windows(tokenize_documents(texts, tok), 10, DataConfig(packing="pad"), tok)
    x, y = rows.batch(np.array([2, 0, 1]))  # any order, as a shuffled epoch asks
    for row, i in enumerate([2, 0, 1]):
        text = docs[i][:9]
        full = [50256, *text, 50256] + [50256] * (11 - len(text) - 2)
        assert x[row].tolist() == full[:-1]
        assert y[row].tolist() == full[1:len(text) + 2] + [IGNORE_INDEX] * (10 - len(text) - 1)
    assert (y != IGNORE_INDEX).sum(1).tolist() == [min(len(docs[i]), 9) + 1 for i in (2, 0, 1)]


def test_documents_of_prepared_shards_are_the_runs_between_separators():
    """Shards start every document with <|endoftext|>; text puts it between documents: the same rows."""
    tok = get_tokenizer("gpt2")
    text = tokenize_documents(["ab cd", "ef", "gh ij kl"], tok)
    shards = np.concatenate([[tok.eot_id], text])
    a = make_windows(text, 6, DataConfig(packing="pad"), tok)
    b = make_windows(shards, 6, DataConfig(packing="pad"), tok)
    assert len(a) == len(b) == 3
    for got, want in zip(a.batch(np.arange(3)), b.batch(np.arange(3))):
        assert torch.equal(got, want)


def test_documents_read_from_memory_mapped_shards_in_chunks(tmp_path):
    """Shards are scanned for separators a chunk at a time; a document may cross a shard or a chunk."""
    g = np.random.default_rng(0)
    tokens = g.integers(1, 50, 500).astype(np.uint16)
    tokens[g.choice(500, 40, replace=False)] = 0  # separators, some adjacent (empty documents)
    tokens[0] = 0
    paths = []
    for i, (lo, hi) in enumerate([(0, 130), (130, 131), (131, 500)]):
        paths.append(tmp_path / f"train-{i:06d}.bin")
        tokens[lo:hi].tofile(paths[-1])
    shards = ShardedTokens(paths, [130, 1, 369], np.uint16)
    starts, lengths = document_spans(shards, 0, chunk=64)
    want, start = [], 0  # (start, length) of the runs between separators, empty ones left out
    for i, t in enumerate([*tokens.tolist(), 0]):
        if t == 0:
            if i > start:
                want.append((start, i - start))
            start = i + 1
    assert list(zip(starts.tolist(), lengths.tolist())) == want
    a = PaddedDocuments(shards, 12, 3, 4, 5, 0)
    b = PaddedDocuments(tokens, 12, 3, 4, 5, 0)
    for got, expected in zip(a.batch(np.arange(len(a))), b.batch(np.arange(len(b)))):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("vocab,rows", [(97, 97), (1000, 1024)])
def test_fused_head_loss_ignores_padding(vocab, rows):
    g = torch.Generator().manual_seed(vocab)
    h = torch.randn(11, 24, generator=g, requires_grad=True)
    w = (torch.randn(rows, 24, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, vocab, (11,), generator=g)
    y[[0, 4, 5, 10]] = IGNORE_INDEX
    loss = ops.head_cross_entropy(h, w, y, vocab)
    (loss * 2.5).backward()
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h_ref @ w_ref[:vocab].t(), y)
    (ref * 2.5).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(h.grad[[0, 4, 5, 10]] == 0)
    none = torch.full_like(y, IGNORE_INDEX)  # nothing scored: NaN, as F.cross_entropy gives
    assert ops.head_cross_entropy(h, w, none, vocab).isnan() and F.cross_entropy(h @ w[:vocab].t(), none).isnan()


def test_evaluation_counts_only_scored_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, context_length=8, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0))
    g = torch.Generator().manual_seed(1)
    batches = []
    for scored in (8, 3):  # a full row batch, then one mostly padding
        x, y = torch.randint(0, 101, (2, 8), generator=g), torch.randint(0, 101, (2, 8), generator=g)
        y[:, scored:] = IGNORE_INDEX
        batches.append((x, y))
    result = evaluate(model, batches)
    with torch.no_grad():
        nll = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none") for x, y in batches]
    kept = torch.cat([n[y.flatten() != IGNORE_INDEX] for n, (_, y) in zip(nll, batches)])
    assert result.tokens == 2 * 8 + 2 * 3 and result.loss == pytest.approx(kept.mean().item(), rel=1e-5)
    assert loss_batch(model, *batches[1]).item() == pytest.approx(kept[16:].mean().item(), rel=1e-5)


def test_training_with_pad_packing_counts_scored_tokens(tmp_path):
    from pydoc_data.topics import topics

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, key in enumerate(sorted(topics)[:40]):  # documents shorter and longer than a row
        (docs / f"{i:02d}.txt").write_text(topics[key][: 60 + 15 * i], encoding="utf-8")
    cfg = tiny_run(docs, max_steps=3, eval_every=3, sample_tokens=0, grad_accum=2)
    cfg.data = DataConfig(val_fraction=0.2, packing="pad")
    cfg.model.drop_rate = 0.0
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    assert np.isfinite(summary["val_loss"])
    data = build_data(cfg, get_tokenizer("gpt2"))
    micro = [data.batches.batch(0, b) for b in range(6)]
    per_step = [sum(int((y != IGNORE_INDEX).sum()) for _, y in micro[2 * s:2 * s + 2]) for s in range(3)]
    assert 0 < min(per_step) and max(per_step) < 2 * 4 * 32  # padding is left out of the count
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["tokens"] for r in train_records] == list(np.cumsum(per_step))
    # micro-batches weighted by their scored targets: accumulating 2 x 4 rows trains what 8 rows at once do
    cfg.train.batch_size, cfg.train.grad_accum = 8, 1
    train(cfg, tmp_path / "run-8", log=lambda *_: None)
    at_once = [json.loads(line) for line in open(tmp_path / "run-8" / "metrics.jsonl")]
    at_once = [r for r in at_once if r["event"] == "train"]
    assert [r["tokens"] for r in at_once] == [r["tokens"] for r in train_records]
    for a, b in zip(at_once, train_records):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_settings_refused_with_pad_and_shown_in_help(capsys):
    for bad, flag in ((dict(document_mask=True), "--document-mask"), (dict(sampling="random"), "--sampling random"),
                      (dict(stride=4), "--stride")):
        with pytest.raises(ConfigError, match=flag):
            build(DataConfig, dict(packing="pad", **bad))
    code, out, _ = run(["train", "--help"], capsys)
    out = " ".join(out.split())
    assert code == 0
    assert re.search(r"--document-mask / --no-document-mask .*?\[default: False\]", out)
    assert re.search(r"--packing \[concat\|pad\] .*?\[default: concat\]", out)
    code, out, _ = run(["eval", "--help"], capsys)
    assert "--document-mask" in out and "[default: False]" in " ".join(out.split())

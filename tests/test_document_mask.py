"""--document-mask: each document of a packed window is computed as if it ran alone (its own positions, no
attention across an end-of-text token), against the reference of running each document by itself."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_run

from gptforge.data import DataConfig
from gptforge.evaluate import evaluate, loss_batch, segments_of
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.models.layers import document_mask, document_positions
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.training import train

EOT = 0
MODELS = {
    "gpt2": lambda: GPT(GPTConfig(vocab_size=53, context_length=24, emb_dim=32, n_heads=4, n_layers=2,
                                  drop_rate=0.0)),
    "llama-gqa-qknorm": lambda: Llama(LlamaConfig(vocab_size=53, context_length=24, emb_dim=32, n_heads=4,
                                                  n_kv_heads=2, n_layers=2, qk_norm=True)),
    "llama-mha": lambda: Llama(LlamaConfig(vocab_size=53, context_length=24, emb_dim=32, n_heads=4, n_layers=2)),
}


def packed_batch():
    """Two windows of 24 tokens: documents of several lengths, an end-of-text at the very start and end of
    a row, and one row that is a single document."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 53, (3, 24), generator=g)
    x[0, [5, 6, 15]] = EOT  # documents [0:5] [5:6] [6:15] [15:24] (an empty one: a lone end-of-text)
    x[1, [0, 23]] = EOT  # [0:23] [23:24]
    return x  # row 2: no end-of-text, one document


def documents(row: torch.Tensor) -> list[tuple[int, int]]:
    starts = [0] + [i for i in range(len(row)) if row[i] == EOT and i > 0]
    return list(zip(starts, starts[1:] + [len(row)]))


def test_positions_restart_and_mask_stays_inside_documents():
    x = packed_batch()
    seg = segments_of(x, EOT)
    pos = document_positions(seg)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert pos[1].tolist() == list(range(23)) + [0] and pos[2].tolist() == list(range(24))
    mask = document_mask(seg)[:, 0]  # (B, T, T)
    for b in range(3):
        for lo, hi in documents(x[b]):
            for q in range(lo, hi):
                assert mask[b, q].nonzero().flatten().tolist() == list(range(lo, q + 1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_logits_equal_each_document_run_alone(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = packed_batch()
    with torch.no_grad():
        packed = model(x, segments=segments_of(x, EOT))
        for b in range(x.size(0)):
            for lo, hi in documents(x[b]):
                alone = model(x[b:b + 1, lo:hi])[0]
                torch.testing.assert_close(packed[b, lo:hi], alone, rtol=1e-5, atol=1e-5)
        plain = model(x)
    assert not torch.allclose(packed[0, 6:], plain[0, 6:], atol=1e-3)  # without the mask, documents see each other
    torch.testing.assert_close(packed[2], plain[2], rtol=1e-5, atol=1e-5)  # one document: as before


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-qknorm"])
def test_masked_loss_and_gradients_equal_per_document_reference(name):
    """loss_batch with eot_id (the fused CPU loss, the masked attention) against the token-weighted mean of
    each document's own cross-entropy, gradients included."""
    torch.manual_seed(0)
    model = MODELS[name]()
    x = packed_batch()
    y = torch.roll(x, -1, dims=1)
    loss = loss_batch(model, x, y, EOT)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    total = 0.0
    for b in range(x.size(0)):
        for lo, hi in documents(x[b]):
            logits = model(x[b:b + 1, lo:hi])[0]
            total = total + F.cross_entropy(logits, y[b, lo:hi], reduction="sum")
    ref = total / y.numel()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_dropout_works_with_the_mask():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=53, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.5))
    x = packed_batch()
    loss_a = loss_batch(model.train(), x, x, EOT)
    loss_a.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss_batch(model, x, x, EOT).item() != loss_a.item()  # dropout draws anew
    assert evaluate(model, [(x, x)], eot_id=EOT).loss == evaluate(model, [(x, x)], eot_id=EOT).loss


def test_cache_with_segments_is_refused():
    from gptforge.models.layers import KVCache

    model = MODELS["gpt2"]().eval()
    x = packed_batch()
    with pytest.raises(AssertionError, match="no KV cache"):
        model(x, KVCache(model.cfg, 3, "cpu", torch.float32), segments=segments_of(x, EOT))


def test_training_with_document_mask(tmp_path):
    """A run with --document-mask trains on short documents, counts every token, and writes the setting."""
    from pydoc_data.topics import topics

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, key in enumerate(sorted(topics)[:30]):  # ~100-token documents: several per window
        (docs / f"{i:02d}.txt").write_text(topics[key][:400], encoding="utf-8")
    runs = {}
    for mask in (False, True):
        cfg = tiny_run(docs, max_steps=3, eval_every=3, sample_tokens=0)
        cfg.data = DataConfig(val_fraction=0.1, document_mask=mask)
        runs[mask] = train(cfg, tmp_path / f"run-{mask}", log=lambda *_: None)
        records = [json.loads(line) for line in open(tmp_path / f"run-{mask}" / "metrics.jsonl")]
        assert [r["tokens"] for r in records if r["event"] == "train"] == [128, 256, 384]  # 4 x 32 per step
    assert runs[True]["val_loss"] != runs[False]["val_loss"]
    assert 'document_mask = true' in (tmp_path / "run-True" / "config.toml").read_text()


def test_eval_with_document_mask(tmp_path, capsys):
    """`gptforge eval --document-mask` scores each document of a window alone: the masked loss of its windows."""
    from clirun import run

    from gptforge.checkpoint import save_weights
    from gptforge.data import Batches, TokenWindows, tokenize_documents
    from gptforge.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    save_weights(tmp_path / "model.safetensors", model, "gpt2")
    texts = ["The cat sat on the mat.", "A dog ran far away from home today.", "Birds sing."] * 3
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    tok = get_tokenizer("gpt2")
    batches = Batches(TokenWindows(tokenize_documents(texts, tok), 16), 8, shuffle=False, drop_last=False)
    for flags, eot_id in (([], None), (["--document-mask"], tok.eot_id)):
        code, out, err = run(["eval", str(tmp_path / "model.safetensors"), *[str(tmp_path / f"{i}.txt")
                              for i in range(len(texts))], "--json", "--device", "cpu", *flags], capsys)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["loss"] == pytest.approx(
            evaluate(model, batches, eot_id=eot_id).loss, rel=1e-6)
    assert evaluate(model, batches, eot_id=tok.eot_id).loss != evaluate(model, batches).loss

import pytest
import torch

from gptforge.generate import SampleConfig, filter_top_k, filter_top_p, generate, next_token
from gptforge.models import KVCache


def test_greedy_picks_argmax_and_top_k_1_equals_greedy(tiny_model, tiny_cfg):
    torch.manual_seed(0)
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 5))
    greedy = generate(tiny_model, idx, SampleConfig(max_new_tokens=12))
    g = torch.Generator().manual_seed(7)
    top1 = generate(tiny_model, idx, SampleConfig(max_new_tokens=12, temperature=1.5, top_k=1), generator=g)
    assert greedy == top1
    # greedy by hand for row 0
    seq = idx[:1]
    for _ in range(12):
        seq = torch.cat([seq, tiny_model(seq[:, -tiny_cfg.context_length:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert seq[0, 5:].tolist() == greedy[0]


def test_batch_rows_equal_single_row_generation(tiny_model, tiny_cfg):
    torch.manual_seed(3)
    idx = torch.randint(0, tiny_cfg.vocab_size, (4, 6))
    cfg = SampleConfig(max_new_tokens=10)
    batch = generate(tiny_model, idx, cfg)
    for b in range(4):
        assert generate(tiny_model, idx[b : b + 1], cfg)[0] == batch[b]


def test_fixed_seed_repeats_samples_for_batches(tiny_model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (4, 3))
    cfg = SampleConfig(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(tiny_model, idx, cfg, generator=torch.Generator().manual_seed(11))
    b = generate(tiny_model, idx, cfg, generator=torch.Generator().manual_seed(11))
    c = generate(tiny_model, idx, cfg, generator=torch.Generator().manual_seed(12))
    assert a == b and a != c


def test_top_k_is_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [9.0, 0.0, 8.0, 1.0]])
    out = filter_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]])
    out = filter_top_p(probs.log(), 0.8)
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [False, True, False, False]]
    assert torch.isfinite(filter_top_p(probs.log(), 1.0)).all()  # p = 1 keeps everything with mass


def test_sampling_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, 0.1, 0.2, 5.0, 4.9]]).repeat(200, 1)
    tok = next_token(logits, SampleConfig(temperature=2.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(tok.flatten().tolist()) == {3, 4}


def test_end_token_stops_each_row_independently(tiny_model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 4))
    free = generate(tiny_model, idx, SampleConfig(max_new_tokens=15))
    eos = free[1][2]  # the third token of row 1 becomes the end token
    out = generate(tiny_model, idx, SampleConfig(max_new_tokens=15), eos_id=eos)
    for row, ref in zip(out, free):
        stop = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row == ref[:stop]
    assert out[1][-1] == eos and len(out[1]) <= 3


def test_several_end_tokens_stop_a_row_at_the_first_of_them(tiny_model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 4))
    free = generate(tiny_model, idx, SampleConfig(max_new_tokens=15))
    stops = (free[0][5], free[1][2])  # a tokenizer's stop_ids: its eos and <|endoftext|>
    out = generate(tiny_model, idx, SampleConfig(max_new_tokens=15), eos_id=stops)
    for row, ref in zip(out, free):
        assert row == ref[: min(ref.index(s) for s in stops if s in ref) + 1]


def test_context_is_cropped(tiny_model, tiny_cfg):
    idx = torch.randint(0, tiny_cfg.vocab_size, (1, tiny_cfg.context_length + 9))
    out = generate(tiny_model, idx, SampleConfig(max_new_tokens=3))
    cropped = generate(tiny_model, idx[:, -tiny_cfg.context_length:], SampleConfig(max_new_tokens=3))
    assert out == cropped and len(out[0]) == 3


def test_sample_config_validation():
    with pytest.raises(ValueError, match="--top-p"):
        SampleConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(temperature=-1)
    with pytest.raises(ValueError, match="--temperature must be a finite number"):
        SampleConfig(temperature=float("inf"))
    with pytest.raises(ValueError, match="--top-k must be at least 1, got 0"):
        SampleConfig(top_k=0)
    with pytest.raises(ValueError, match=r"--top-p must be in \(0, 1\], got 0"):
        SampleConfig(top_p=0)
    SampleConfig(max_new_tokens=0, temperature=0.0, top_k=1, top_p=1.0)  # the edges are allowed


def test_kv_cache_generation_equals_recomputation(tiny_model, tiny_cfg):
    """Greedy tokens with the cache equal those without it, for a batch, through the context limit."""
    torch.manual_seed(4)
    idx = torch.randint(0, tiny_cfg.vocab_size, (3, 5))
    cfg = SampleConfig(max_new_tokens=tiny_cfg.context_length + 4)  # runs past the 16-token context
    uncached = generate(tiny_model, idx, cfg, use_cache=False)
    assert generate(tiny_model, idx, cfg) == uncached
    assert generate(tiny_model, idx[1:2], cfg)[0] == uncached[1]  # a row alone equals its row in the batch


def test_kv_cache_logits_match_full_forward(tiny_model, tiny_cfg):
    """Prefill 5 tokens, then a 3-token chunk, then single tokens: logits equal one full forward pass."""
    torch.manual_seed(5)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 12))
    full = tiny_model(x)
    cache = KVCache(tiny_cfg, 2, "cpu", torch.float32)
    parts = [tiny_model(x[:, :5], cache), tiny_model(x[:, 5:8], cache)]
    parts += [tiny_model(x[:, t : t + 1], cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12
    with pytest.raises(IndexError, match="longer than the model's context_length"):
        tiny_model(torch.zeros(2, 5, dtype=torch.long), cache)


def test_generate_reports_timing(tiny_model, tiny_cfg):
    stats = {}
    out = generate(tiny_model, torch.zeros(2, 3, dtype=torch.long), SampleConfig(max_new_tokens=4), stats=stats)
    assert stats["tokens"] == 8 == sum(map(len, out))
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0

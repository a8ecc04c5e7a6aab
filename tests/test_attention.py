"""--attention: FlexAttention with a block mask of the documents equals the dense-mask path (forward only on a CPU:
FlexAttention has no CPU backward), auto keeps the CPU path as it was, and the flag reaches train, eval and bench."""

import json

import pytest
import torch
from test_document_mask import EOT, MODELS, packed_batch

from gptforge.evaluate import segments_of
from gptforge.models.layers import BlockMask, document_mask, packed_mask, uses_flex
from gptforge.training.config import TrainConfig


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flex_forward_equals_the_dense_mask(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = packed_batch()
    seg = segments_of(x, EOT)
    out = {}
    with torch.no_grad():
        for kind in ("sdpa", "flex"):
            model.attention = kind
            out[kind] = model(x, segments=seg)
    torch.testing.assert_close(out["flex"], out["sdpa"], rtol=1e-5, atol=1e-5)


def test_flex_forward_under_bf16_autocast():
    """Under autocast, queries (fp32 after the rotary rotation) and values (bf16) meet in the autocast dtype."""
    torch.manual_seed(0)
    model = MODELS["llama-gqa-qknorm"]().eval()
    x = packed_batch()
    out = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for kind in ("sdpa", "flex"):
            model.attention = kind
            out[kind] = model(x, segments=segments_of(x, EOT)).float()
    torch.testing.assert_close(out["flex"], out["sdpa"], rtol=0.05, atol=0.05)  # bf16: 8 bits of mantissa


def test_the_mask_each_choice_builds():
    seg = segments_of(packed_batch(), EOT)
    assert not uses_flex("auto", torch.device("cpu"), 0.0)  # on a CPU auto keeps the dense mask: nothing changes
    assert uses_flex("auto", torch.device("cuda"), 0.0) and not uses_flex("auto", torch.device("cuda"), 0.1)
    assert not uses_flex("sdpa", torch.device("cuda"), 0.0)
    assert torch.equal(packed_mask(seg, "auto", 0.0), document_mask(seg))
    block = packed_mask(seg, "flex", 0.0)
    assert isinstance(block, BlockMask) and block.shape[-2:] == (24, 24)


def test_flex_refuses_what_it_cannot_do():
    from gptforge.errors import ConfigError
    from gptforge.models.gpt2 import GPT, GPTConfig

    x = packed_batch()
    model = MODELS["gpt2"]()
    model.attention = "flex"
    with pytest.raises(ConfigError, match="no backward on a CPU"):
        model(x, segments=segments_of(x, EOT))
    dropped = GPT(GPTConfig(vocab_size=53, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1))
    dropped.attention = "flex"
    with pytest.raises(ConfigError, match="no attention dropout"):
        dropped(x, segments=segments_of(x, EOT))


def test_attention_setting_is_checked():
    from gptforge.errors import ConfigError

    assert TrainConfig().attention == "auto"
    with pytest.raises(ConfigError, match="--attention"):
        TrainConfig(attention="flash")


def test_eval_and_bench_take_the_flag(tmp_path, capsys):
    """`eval --document-mask --attention flex` gives the sdpa loss; `bench train --document-mask` runs."""
    from clirun import run

    from gptforge.checkpoint import save_weights
    from gptforge.models.gpt2 import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    save_weights(tmp_path / "model.safetensors", model, "gpt2")
    text = tmp_path / "a.txt"
    text.write_text("The cat sat on the mat.<|endoftext|>A dog ran far away.<|endoftext|>Birds sing." * 4)
    losses = {}
    for kind in ("sdpa", "flex"):
        code, out, err = run(["eval", str(tmp_path / "model.safetensors"), str(text), "--json", "--device", "cpu",
                              "--document-mask", "--attention", kind], capsys)
        assert code == 0, err
        losses[kind] = json.loads(out.strip().splitlines()[-1])["loss"]
    assert losses["flex"] == pytest.approx(losses["sdpa"], rel=1e-5)
    code, out, err = run(["bench", "train", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                          "--document-mask", "--attention", "sdpa", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert "document mask True (attention sdpa)" in out and json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


@pytest.mark.slow
def test_flex_inside_a_compiled_model_equals_the_dense_mask():
    """--compile with --attention flex: the block mask and FlexAttention traced into the model's graph (about a minute
    of compiling on a CPU, hence slow) give the dense mask's logits."""
    torch.manual_seed(0)
    model = MODELS["llama-gqa-qknorm"]().eval()
    x = packed_batch()
    seg = segments_of(x, EOT)
    with torch.no_grad():
        model.attention = "sdpa"
        dense = model(x, segments=seg)
        model.attention = "flex"
        compiled = torch.compile(model)(x, segments=seg)
    torch.testing.assert_close(compiled, dense, rtol=1e-5, atol=1e-5)


def test_train_on_a_cpu_auto_is_sdpa_bit_for_bit(tmp_path):
    """`train --document-mask`: --attention auto trains exactly as sdpa on a CPU (nothing changes there), and the
    choice is saved in config.toml's [train], not in the model's settings."""
    from pydoc_data.topics import topics

    from test_train import losses, tiny_run

    from gptforge.data import DataConfig
    from gptforge.training import train

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    runs = {}
    for kind in ("auto", "sdpa"):
        cfg = tiny_run(text, max_steps=3, eval_every=3, sample_tokens=0, attention=kind)
        cfg.data = DataConfig(val_fraction=0.1, document_mask=True)
        train(cfg, tmp_path / kind, log=lambda *_: None)
        runs[kind] = losses(tmp_path / kind)
    assert runs["auto"] == runs["sdpa"]
    saved = (tmp_path / "sdpa" / "config.toml").read_text()
    assert 'attention = "sdpa"' in saved.split("[train]")[1] and "attention" not in saved.split("[model]")[1].split(
        "[")[0]

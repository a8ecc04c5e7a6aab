"""nanoGPT's ckpt.pt as a SOURCE, against nanoGPT's own model (tests/data/nanogpt/model.py, its MIT licence kept).

A random nanoGPT GPT (every weight perturbed, so biases and LayerNorms matter) is saved as its train.py
saves it (model, optimizer, model_args, iter_num, best_val_loss, config; `_orig_mod.` keys as a
torch.compile'd run leaves them), loaded through gptforge's production path, and must give nanoGPT's logits.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from clirun import run

from gptforge.weights import WeightsError, load_any

REFERENCE = Path(__file__).parent / "data" / "nanogpt" / "model.py"
GPT2_VOCAB, PADDED = 50257, 50304


def nanogpt_module():
    spec = importlib.util.spec_from_file_location("nanogpt_model", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NANO = nanogpt_module()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def nanogpt_model(bias=True, vocab_size=101, seed=0, n_layer=2):
    torch.manual_seed(seed)
    args = dict(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=vocab_size, dropout=0.0)
    model = NANO.GPT(NANO.GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), args


def save_ckpt(model, args, path: Path, compiled=True) -> Path:
    """What nanoGPT's train.py writes: its optimizer after a step, and `_orig_mod.` keys from a compiled model."""
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, args["vocab_size"], (2, 8))
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    sd = model.state_dict()
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    config = {"out_dir": "out", "eval_interval": 2000, "dataset": "openwebtext", "learning_rate": 6e-4,
              "compile": compiled, "dtype": "bfloat16", "wandb_log": False, "init_from": "scratch"}
    checkpoint = {"model": sd, "optimizer": optimizer.state_dict(), "model_args": args, "iter_num": 1,
                  "best_val_loss": torch.tensor(3.5), "config": config}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def nano_logits(model, idx):
    with torch.no_grad():
        logits, _ = model(idx, idx)  # with targets nanoGPT returns every position's logits
    return logits


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_logits_equal_nanogpt(tmp_path, bias, compiled):
    nano, args = nanogpt_model(bias=bias)
    path = save_ckpt(nano, args, tmp_path / "out" / "ckpt.pt", compiled)
    ours, meta = load_any(path)
    ours.eval()
    assert meta["format"] == "nanogpt" and "tokenizer" not in meta  # 101 ids: not GPT-2's
    cfg = ours.cfg
    assert (cfg.bias, cfg.qkv_bias, cfg.gelu, cfg.tie_weights, cfg.pad_vocab) == (bias, bias, "exact", True, False)
    assert (cfg.n_layers, cfg.n_heads, cfg.emb_dim, cfg.context_length, cfg.vocab_size) == (2, 2, 32, 16, 101)
    if not bias:
        assert not any(n.endswith(".bias") for n, _ in ours.named_parameters())
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), nano_logits(nano, idx), atol=1e-5, rtol=1e-5)
    again, _ = load_any(tmp_path / "out")  # nanoGPT's out_dir names its ckpt.pt
    assert again.cfg == cfg


def test_padded_vocab_gives_the_first_50257_logits(tmp_path):
    nano, args = nanogpt_model(bias=False, vocab_size=PADDED, n_layer=1)
    path = save_ckpt(nano, args, tmp_path / "ckpt.pt")
    ours, meta = load_any(path)
    ours.eval()
    assert meta["tokenizer"] == "gpt2"
    assert (ours.cfg.vocab_size, ours.cfg.pad_vocab, ours.padded_vocab) == (GPT2_VOCAB, True, PADDED)
    assert ours.wte.weight[GPT2_VOCAB:].abs().max() == 0  # the padding rows no token id reaches: zeros here
    idx = torch.randint(0, GPT2_VOCAB, (2, 16))
    with torch.no_grad():
        logits = ours(idx)
    assert logits.shape == (2, 16, GPT2_VOCAB)
    torch.testing.assert_close(logits, nano_logits(nano, idx)[..., :GPT2_VOCAB], atol=1e-5, rtol=1e-5)


def test_bad_model_args_are_one_line(tmp_path):
    nano, args = nanogpt_model()
    path = save_ckpt(nano, dict(args, n_head="two"), tmp_path / "ckpt.pt", compiled=False)
    with pytest.raises(WeightsError, match=r"ckpt.pt: model_args\['n_head'\] is 'two'"):
        load_any(path)
    path = save_ckpt(nano, dict(args, n_embd=48), tmp_path / "wide" / "ckpt.pt", compiled=False)
    with pytest.raises(WeightsError, match="tensor 'transformer.wte.weight' has shape"):
        load_any(path)


def test_cli_eval_generate_convert_and_init_from(tmp_path, capsys, text_file):
    transformers = pytest.importorskip("transformers")
    nano, args = nanogpt_model(bias=False, vocab_size=PADDED, n_layer=1)
    path = save_ckpt(nano, args, tmp_path / "out" / "ckpt.pt")
    code, out, err = run(["eval", str(path), str(text_file), "--batch-size", "2", "--max-batches", "2",
                          "--device", "cpu"], capsys)
    assert code == 0 and "perplexity" in out, err
    code, out, err = run(["generate", str(tmp_path / "out"), "--prompt", "Hello", "--max-new-tokens", "4",
                          "--temperature", "0", "--device", "cpu"], capsys)
    assert code == 0 and out.startswith("Hello"), err
    # to Hugging Face: zero biases and exact GELU give nanoGPT's logits in GPT2LMHeadModel
    code, out, err = run(["convert", str(path), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, nano_logits(nano, idx)[..., :GPT2_VOCAB], atol=1e-5, rtol=1e-5)
    back, _ = load_any(tmp_path / "hf")  # and back: the gptforge config in the metadata restores bias = false
    assert not back.cfg.bias and back.cfg.gelu == "exact"
    code, out, err = run(["train", str(text_file), "--init-from", str(path), "--max-steps", "1", "--batch-size", "2",
                          "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "2", "--device", "cpu",
                          "--no-progress", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    trained, _ = load_any(tmp_path / "run")
    assert not trained.cfg.bias and trained.cfg.gelu == "exact" and trained.cfg.context_length == 16
    assert (trained.wpe.weight - nano.transformer.wpe.weight).abs().max() < 5e-3  # one small step away

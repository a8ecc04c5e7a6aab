"""nanoGPT's ckpt.pt as a SOURCE, built here from its documented layout and checked against transformers.

nanoGPT's model keeps GPT-2's names (``transformer.wte``, ``h.N.attn.c_attn``, ``ln_f``, a tied ``lm_head``)
but computes with ``nn.Linear``, so its matrices are (out, in) where Hugging Face's ``Conv1D`` stores (in, out);
it uses exact GELU, and ``bias=False`` drops every Linear and LayerNorm bias. A random transformers
GPT2LMHeadModel (every weight perturbed, so biases and LayerNorms matter) is written out in that layout, inside the
dict nanoGPT's train.py saves (model, optimizer, model_args, iter_num, best_val_loss, config; ``_orig_mod.`` keys
as a torch.compile'd run leaves them), loaded through gptforge's production path, and must give its logits.
Without biases the reference is the same model with its biases zero and frozen, which computes exactly what no
bias does.
"""

from pathlib import Path

import pytest
import torch
from clirun import run

from gptforge.weights import WeightsError, load_any

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

GPT2_VOCAB, PADDED = 50257, 50304


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def nanogpt_shapes(args: dict) -> dict[str, tuple[int, ...]]:
    """nanoGPT's GPT.state_dict() for its model_args, parameters only: names and shapes."""
    c, bias = args["n_embd"], args["bias"]
    shapes = {"transformer.wte.weight": (args["vocab_size"], c), "transformer.wpe.weight": (args["block_size"], c)}
    linears = {"attn.c_attn": (3 * c, c), "attn.c_proj": (c, c), "mlp.c_fc": (4 * c, c), "mlp.c_proj": (c, 4 * c)}
    for i in range(args["n_layer"]):
        block = f"transformer.h.{i}."
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            out_in = linears.get(name, (c,))  # a LayerNorm has a weight of (c,)
            shapes[block + name + ".weight"] = out_in
            if bias:
                shapes[block + name + ".bias"] = out_in[:1]
    shapes["transformer.ln_f.weight"] = (c,)
    if bias:
        shapes["transformer.ln_f.bias"] = (c,)
    shapes["lm_head.weight"] = (args["vocab_size"], c)  # the same tensor as transformer.wte.weight
    return shapes


def reference_model(bias=True, vocab_size=101, seed=0, n_layer=2):
    """A random GPT2LMHeadModel that computes what a nanoGPT GPT with these model_args computes."""
    torch.manual_seed(seed)
    args = dict(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=vocab_size, dropout=0.0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=n_layer, n_head=2,
                                  activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and not bias:
                p.zero_().requires_grad_(False)  # nanoGPT's bias=False: nothing there, and nothing trains it
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), args


def nanogpt_state_dict(model, args: dict, masks=False) -> dict[str, torch.Tensor]:
    """The reference model as nanoGPT's state dict; `masks` adds the causal-mask buffers (attn.bias, (1, 1, T, T))
    that nanoGPT registers on a torch without scaled_dot_product_attention."""
    hf = model.state_dict()
    sd = {}
    for name, shape in nanogpt_shapes(args).items():
        t = hf[name].detach()
        if ".h." in name and t.dim() == 2:
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        assert tuple(t.shape) == shape, (name, tuple(t.shape), shape)
        sd[name] = t.clone()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one tensor under two names
    if masks:
        t = args["block_size"]
        for i in range(args["n_layer"]):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(t, t)).view(1, 1, t, t)
    return sd


def save_ckpt(model, args, path: Path, compiled=True, written_args=None) -> Path:
    """What nanoGPT's train.py writes: its AdamW after a step (2-D tensors decayed, the rest not), and `_orig_mod.`
    keys from a compiled model; an uncompiled one stands for torch < 2, whose attention kept causal masks.
    `written_args`: model_args that disagree with the tensors, for the tests of bad files."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    idx = torch.randint(0, args["vocab_size"], (2, 8))
    model.train()
    model(idx, labels=idx).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    sd = nanogpt_state_dict(model, args, masks=not compiled)
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    config = {"out_dir": "out", "eval_interval": 2000, "dataset": "openwebtext", "learning_rate": 6e-4,
              "compile": compiled, "dtype": "bfloat16", "wandb_log": False, "init_from": "scratch"}
    checkpoint = {"model": sd, "optimizer": optimizer.state_dict(), "model_args": written_args or args, "iter_num": 1,
                  "best_val_loss": torch.tensor(3.5), "config": config}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def ref_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def test_the_layout_is_nanogpts(tmp_path):
    """The file holds exactly nanoGPT's names, (out, in) matrices, one tensor for wte and lm_head, no biases with
    bias=False; compiled keys prefixed."""
    model, args = reference_model(bias=False)
    checkpoint = torch.load(save_ckpt(model, args, tmp_path / "ckpt.pt"), weights_only=True)
    sd = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    assert all(k.startswith("_orig_mod.") for k in checkpoint["model"])
    assert {k: tuple(v.shape) for k, v in sd.items()} == nanogpt_shapes(args)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (96, 32) and "transformer.h.0.ln_1.bias" not in sd
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    assert len(nanogpt_shapes(dict(args, bias=True))) == len(sd) + 6 * args["n_layer"] + 1
    assert {"optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= checkpoint.keys()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_logits_equal_the_reference(tmp_path, bias, compiled):
    ref, args = reference_model(bias=bias)
    path = save_ckpt(ref, args, tmp_path / "out" / "ckpt.pt", compiled)
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
        torch.testing.assert_close(ours(idx), ref_logits(ref, idx), atol=1e-5, rtol=1e-5)
    again, _ = load_any(tmp_path / "out")  # nanoGPT's out_dir names its ckpt.pt
    assert again.cfg == cfg


def test_padded_vocab_gives_the_first_50257_logits(tmp_path):
    ref, args = reference_model(bias=False, vocab_size=PADDED, n_layer=1)
    path = save_ckpt(ref, args, tmp_path / "ckpt.pt")
    ours, meta = load_any(path)
    ours.eval()
    assert meta["tokenizer"] == "gpt2"
    assert (ours.cfg.vocab_size, ours.cfg.pad_vocab, ours.padded_vocab) == (GPT2_VOCAB, True, PADDED)
    assert ours.wte.weight[GPT2_VOCAB:].abs().max() == 0  # the padding rows no token id reaches: zeros here
    idx = torch.randint(0, GPT2_VOCAB, (2, 16))
    with torch.no_grad():
        logits = ours(idx)
    assert logits.shape == (2, 16, GPT2_VOCAB)
    torch.testing.assert_close(logits, ref_logits(ref, idx)[..., :GPT2_VOCAB], atol=1e-5, rtol=1e-5)


def test_bad_model_args_are_one_line(tmp_path):
    ref, args = reference_model()
    path = save_ckpt(ref, args, tmp_path / "ckpt.pt", False, dict(args, n_head="two"))
    with pytest.raises(WeightsError, match=r"ckpt.pt: model_args\['n_head'\] is 'two'"):
        load_any(path)
    path = save_ckpt(ref, args, tmp_path / "wide" / "ckpt.pt", False, dict(args, n_embd=48))
    with pytest.raises(WeightsError, match="tensor 'transformer.wte.weight' has shape"):
        load_any(path)


def test_cli_eval_generate_convert_and_init_from(tmp_path, capsys, text_file):
    ref, args = reference_model(bias=False, vocab_size=PADDED, n_layer=1)
    path = save_ckpt(ref, args, tmp_path / "out" / "ckpt.pt")
    code, out, err = run(["eval", str(path), str(text_file), "--batch-size", "2", "--max-batches", "2",
                          "--device", "cpu"], capsys)
    assert code == 0 and "perplexity" in out, err
    code, out, err = run(["generate", str(tmp_path / "out"), "--prompt", "Hello", "--max-new-tokens", "4",
                          "--temperature", "0", "--device", "cpu"], capsys)
    assert code == 0 and out.startswith("Hello"), err
    # to Hugging Face: zero biases and exact GELU give the nanoGPT model's logits in GPT2LMHeadModel
    code, out, err = run(["convert", str(path), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, GPT2_VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ref_logits(ref, idx)[..., :GPT2_VOCAB], atol=1e-5, rtol=1e-5)
    back, _ = load_any(tmp_path / "hf")  # and back: the gptforge config in the metadata restores bias = false
    assert not back.cfg.bias and back.cfg.gelu == "exact"
    code, out, err = run(["train", str(text_file), "--init-from", str(path), "--max-steps", "1", "--batch-size", "2",
                          "--eval-every", "1", "--eval-batches", "1", "--sample-tokens", "2", "--device", "cpu",
                          "--no-progress", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    trained, _ = load_any(tmp_path / "run")
    assert not trained.cfg.bias and trained.cfg.gelu == "exact" and trained.cfg.context_length == 16
    assert (trained.wpe.weight - ref.transformer.wpe.weight).abs().max() < 5e-3  # one small step away

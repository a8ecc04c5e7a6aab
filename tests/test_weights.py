"""The weights package against Hugging Face transformers (and TensorFlow's own files) as the reference.

Random GPT-2 models are built with transformers, saved in each format gptforge reads, loaded back
through the production path, and must give HF's logits (max abs diff <= 1e-5) and greedy tokens.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run

from gptforge.checkpoint import CheckpointError
from gptforge.generate import SampleConfig, generate
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.weights import TFCheckpointReader, load_any, to_gptforge, to_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TF_DIR = Path(__file__).parent / "data" / "gpt2-tf-tiny"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds waiting (most of all on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)
TINY = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def hf_model(seed=0, scale=0.1, **overrides):
    """A random transformers GPT2LMHeadModel; every weight (biases, LayerNorms too) perturbed."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**TINY, **overrides}, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def assert_same_model(ours: GPT, hf, n_new=6):
    """Equal logits (<= 1e-5) and identical greedy continuations."""
    ours.eval()
    vocab, ctx = hf.config.vocab_size, hf.config.n_positions
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (2, min(ctx, 24) - n_new), generator=g)
    with torch.no_grad():
        diff = (ours(idx) - hf_logits(hf, idx)).abs().max().item()
    assert diff <= 1e-5, diff
    new = generate(ours, idx, SampleConfig(max_new_tokens=n_new, temperature=0.0))
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_new, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert new == ref[:, idx.size(1):].tolist()


def save_bin(hf, d: Path, with_buffers=True) -> Path:
    """pytorch_model.bin as older transformers wrote it: a torch.save'd state dict, causal-mask buffers included."""
    d.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(d)
    sd = dict(hf.state_dict())
    if with_buffers:
        n = hf.config.n_positions
        for i in range(hf.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, d / "pytorch_model.bin")
    return d


def book_state_dict(hf) -> dict:
    """The book GPTModel's state dict holding the same model (the book's load_weights_into_gpt, as key names)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    C = hf.config.n_embd
    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "final_norm.scale": sd["ln_f.weight"], "final_norm.shift": sd["ln_f.bias"],
           "out_head.weight": hf.lm_head.weight.detach().clone()}
    for i in range(hf.config.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        w, bias = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            out[b + f"att.{name}.weight"] = w[:, j * C:(j + 1) * C].T
            out[b + f"att.{name}.bias"] = bias[j * C:(j + 1) * C]
        out[b + "att.out_proj.weight"] = sd[h + "attn.c_proj.weight"].T
        out[b + "att.out_proj.bias"] = sd[h + "attn.c_proj.bias"]
        out[b + "ff.layers.0.weight"] = sd[h + "mlp.c_fc.weight"].T
        out[b + "ff.layers.0.bias"] = sd[h + "mlp.c_fc.bias"]
        out[b + "ff.layers.2.weight"] = sd[h + "mlp.c_proj.weight"].T
        out[b + "ff.layers.2.bias"] = sd[h + "mlp.c_proj.bias"]
        for ours, theirs in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[b + f"{theirs}.scale"] = sd[h + f"{ours}.weight"]
            out[b + f"{theirs}.shift"] = sd[h + f"{ours}.bias"]
        out[b + "att.mask"] = torch.triu(torch.ones(hf.config.n_positions, hf.config.n_positions), diagonal=1)
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- formats b, d, e


@pytest.mark.parametrize("tie", [True, False])
def test_hf_safetensors_dir_and_file(tmp_path, tie):
    hf = hf_model(tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path / "hf")
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        model, meta = load_any(source)
        assert meta["format"] == "hf" and model.cfg.tie_weights is tie
        assert (model.lm_head.weight is model.wte.weight) is tie
        assert_same_model(model, hf)


def test_hf_pytorch_bin_with_mask_buffers(tmp_path):
    hf = hf_model(seed=1)
    d = save_bin(hf, tmp_path / "bin")
    model, _ = load_any(d)
    assert_same_model(model, hf)
    model, _ = load_any(d / "pytorch_model.bin")
    assert_same_model(model, hf)


def test_hf_sharded_safetensors(tmp_path):
    hf = hf_model(seed=2)
    hf.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    assert (tmp_path / "sh" / "model.safetensors.index.json").is_file()
    assert_same_model(load_any(tmp_path / "sh")[0], hf)


@pytest.mark.parametrize("wrapped", [False, True])
def test_book_state_dict(tmp_path, wrapped):
    hf = hf_model(seed=3, tie_word_embeddings=False, n_embd=128, n_head=2)  # book files carry no head count:
    sd = book_state_dict(hf)  # width 128 -> 2 heads of 64, as in every GPT-2 size
    path = tmp_path / "model.pth"
    torch.save({"model_state_dict": sd, "optimizer_state_dict": {}} if wrapped else sd, path)
    model, meta = load_any(path)
    assert meta["format"] == "book"
    assert model.cfg.n_heads == 2 and model.cfg.qkv_bias and not model.cfg.tie_weights
    assert_same_model(model, hf)


def test_book_without_qkv_bias_and_compiled_prefix(tmp_path):
    hf = hf_model(seed=4, tie_word_embeddings=False, n_embd=64, n_head=1)
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.bias.zero_()
    qkv_biases = ("W_query.bias", "W_key.bias", "W_value.bias")
    sd = {k: v for k, v in book_state_dict(hf).items() if not k.endswith(qkv_biases)}
    torch.save({"_orig_mod." + k: v for k, v in sd.items()}, tmp_path / "compiled.pth")
    model, _ = load_any(tmp_path / "compiled.pth")
    assert not model.cfg.qkv_bias
    assert_same_model(model, hf)


def test_book_gptmodel_reference(tmp_path):
    """The book's own GPTModel (package llms-from-scratch, if installed) takes our book state dict as-is."""
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    hf = hf_model(seed=5, tie_word_embeddings=False, n_embd=128, n_head=2)
    book_cfg = {"vocab_size": 101, "context_length": 32, "emb_dim": 128, "n_heads": 2, "n_layers": 2,
                "drop_rate": 0.0, "qkv_bias": True}
    book = ch04.GPTModel(book_cfg).eval()
    book.load_state_dict(book_state_dict(hf), strict=True)
    torch.save(book.state_dict(), tmp_path / "model.pth")
    model, _ = load_any(tmp_path / "model.pth")
    idx = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), book(idx), atol=1e-5, rtol=0)


def test_gptforge_run_round_trip_through_hf(tmp_path):
    """gptforge -> HF (transformers loads it, same logits) -> gptforge: the same config and weights, exactly."""
    for cfg in (GPTConfig(vocab_size=101, context_length=24, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0),
                GPTConfig(vocab_size=101, context_length=24, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True,
                          tie_weights=False, drop_rate=0.05)):
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        first = to_gptforge(model, tmp_path / f"{cfg.qkv_bias}" / "ckpt")
        loaded, meta = load_any(first.parent)
        assert meta["format"] == "gptforge"
        out = to_hf(loaded, tmp_path / f"{cfg.qkv_bias}" / "hf")
        hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        assert_same_model(model, hf)
        back, meta = load_any(out)
        assert back.cfg == cfg and meta["format"] == "hf"
        ref = model.state_dict()
        for k, v in back.state_dict().items():
            assert torch.equal(v, ref[k]), k


def test_hf_export_tokenizer_matches(tmp_path):
    model = GPT(GPTConfig(n_layers=1, emb_dim=32, n_heads=2, context_length=16))
    out = to_hf(model, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Every effort moves you")["input_ids"] == [6109, 3626, 6100, 345]


# ----------------------------------------------------------------------------- format c: TensorFlow


def test_tf_reader_matches_tensorflow():
    """Our TensorFlow-free reader returns exactly what TensorFlow read back from the files it wrote."""
    expected = np.load(TF_DIR / "expected.npz")
    reader = TFCheckpointReader(TF_DIR / "model.ckpt")
    assert sorted(reader.shapes) == sorted(expected.files)
    got = reader.read(expected.files)
    for k in expected.files:
        np.testing.assert_array_equal(got[k].numpy(), expected[k], err_msg=k)


def test_tf_checkpoint_model_matches_hf():
    expected = np.load(TF_DIR / "expected.npz")
    hp = json.loads((TF_DIR / "hparams.json").read_text())
    hf = hf_model(scale=0, vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                  n_layer=hp["n_layer"], n_head=hp["n_head"])
    sd = {}
    for k in expected.files:  # OpenAI's names -> transformers' (model/h0/attn/c_attn/w -> transformer.h.0.attn...)
        name = re.sub(r"^model/h(\d+)/", r"transformer.h.\1.", k).replace("model/", "transformer.").replace("/", ".")
        name = re.sub(r"\.(w|g)$", ".weight", re.sub(r"\.b$", ".bias", name))
        name = name + ".weight" if name.endswith(("wte", "wpe")) else name
        value = torch.from_numpy(expected[k])
        sd[name] = value[0] if value.ndim == 3 else value  # w: (1, in, out) -> Conv1D (in, out)
    result = hf.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # the head is tied
    model, meta = load_any(TF_DIR)
    assert meta["format"] == "tf"
    assert_same_model(model, hf)
    model, _ = load_any(TF_DIR / "model.ckpt.index")
    assert_same_model(model, hf)


# ----------------------------------------------------------------------------- format a: hub id from the cache


def fake_hub_cache(root: Path, repo: str, hf) -> Path:
    """The huggingface_hub cache layout for one model: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    hf.save_pretrained(repo_dir / "snapshots" / commit)
    return root


def test_hub_id_resolves_from_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hf = hf_model(seed=6)
    home = fake_hub_cache(tmp_path, "gpt2", hf)
    fake_hub_cache(tmp_path, "openai-community/gpt2", hf)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # the book's gpt_download.py leaves ./gpt2/124M/ (a TF checkpoint) in the working directory
    import shutil

    shutil.copytree(TF_DIR, tmp_path / "cwd" / "gpt2" / "124M")
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_any("gpt2/124M")[1]["format"] == "tf"
    for repo in ("gpt2", "openai-community/gpt2"):
        model, meta = load_any(repo)
        assert meta["format"] == "hub" and meta["source"] == repo
        assert_same_model(model, hf)
    msg = _err("gpt2-medium")
    assert msg.startswith("gpt2-medium: no such local path, and as a Hugging Face model id its config.json is not in "
                          "the cache") and "HF_HUB_OFFLINE" in msg


def test_local_paths_never_ask_the_hub(tmp_path, monkeypatch):
    """A SOURCE that is, or is written as, a local path fails at once: no hub lookup (its retries take ~25 s)."""
    import huggingface_hub

    from gptforge import weights

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cases = {
        "runs/x": "runs/x: a directory without checkpoints or model weights",  # exists, holds nothing
        "./runs/y": "./runs/y: no such file or directory",
        "../nowhere/y": "../nowhere/y: no such file or directory",
        str(tmp_path / "none"): "none: no such file or directory",
        "~/surely-not-here-gptforge": "surely-not-here-gptforge: no such file or directory",
        "runs/y": "runs/y: no such file or directory (runs is a local directory",
    }
    for source, message in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load_any(source)
    # a hub id still goes to the hub, also when ./gpt2/ exists (the book's downloads live there)
    (tmp_path / "gpt2").mkdir()
    asked = []

    def fake_hub(repo_id):
        asked.append(repo_id)
        raise LookupError(repo_id)

    monkeypatch.setattr(weights.load, "_hub_snapshot", fake_hub)
    for source in ("gpt2", "someone/model"):
        with pytest.raises(LookupError):
            load_any(source)
    assert asked == ["gpt2", "someone/model"]


def test_unreachable_hub_answers_at_once(tmp_path, monkeypatch):
    """A hub id not in the cache while the hub's host cannot be reached: one line after one connection attempt, not
    huggingface_hub's ~25 s of retries (no download is attempted at all)."""
    import socket as socket_module

    from huggingface_hub import constants

    from gptforge import weights

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    downloads, connects = [], []

    def download(repo_id, name, local_files_only=False, **kwargs):
        downloads.append((repo_id, name, local_files_only))
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError(f"{repo_id}/{name} not cached")

    def connect(address, timeout=None):
        connects.append(address)
        raise OSError("Name or service not known")

    monkeypatch.setattr(weights.load, "hf_hub_download", download)
    monkeypatch.setattr(socket_module, "create_connection", connect)
    with pytest.raises(CheckpointError, match="someone/model: no such local path.*the hub could not be reached"):
        load_any("someone/model")
    assert downloads == [("someone/model", "config.json", True)]  # the cache only
    assert len(connects) == 1 and connects[0][0] in constants.ENDPOINT  # huggingface.co unless HF_ENDPOINT says


def test_cli_eval_hub_id_offline_env(tmp_path, text_file):
    """The real environment variables, through the CLI: HF_HOME's cache, HF_HUB_OFFLINE=1."""
    hf = hf_model(seed=6, vocab_size=50257, n_positions=64, n_embd=16, n_head=2, n_layer=1)
    home = fake_hub_cache(tmp_path / "hf_home", "gpt2", hf)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "gptforge", "eval", "gpt2", str(text_file), "--context-length", "32",
                           "--max-batches", "2", "--device", "cpu", "--json"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # the reference: transformers' loss on the same windows
    from gptforge.data import TokenWindows, read_texts, tokenize_documents
    from gptforge.tokenizer import GPT2Tokenizer

    windows = TokenWindows(tokenize_documents(read_texts([text_file]), GPT2Tokenizer()), 32)
    x, y = windows.batch(list(range(16)))
    loss = torch.nn.functional.cross_entropy(hf_logits(hf, x).flatten(0, 1), y.flatten()).item()
    assert got["tokens"] == 16 * 32 and got["loss"] == pytest.approx(loss, abs=1e-4)


# ----------------------------------------------------------------------------- the real 124M shape


def test_gpt2_124m_shape(tmp_path, one_thread):
    torch.set_num_threads(one_thread)  # a real-sized model: all threads, back to one afterwards
    try:
        _check_124m(tmp_path)
    finally:
        torch.set_num_threads(1)


def _check_124m(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(cfg)
    hf = hf.to_empty(device="cpu").eval()  # random weights without transformers' slower init
    torch.manual_seed(7)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
    hf.tie_weights()
    hf.save_pretrained(tmp_path / "124m")
    model, _ = load_any(tmp_path / "124m")
    assert model.num_params() == 124_439_808
    assert_same_model(model, hf, n_new=2)


# ----------------------------------------------------------------------------- cropping and init-from config


def test_context_crop_keeps_first_positions(tmp_path):
    hf = hf_model(seed=8)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_any(tmp_path / "hf", context_length=8)
    assert model.cfg.context_length == 8 and model.wpe.weight.shape == (8, 32)
    idx = torch.randint(0, 101, (1, 8))
    torch.testing.assert_close(model.eval()(idx), hf_logits(hf, idx), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad files: one line each


def _err(source, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_any(source, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_name_file_key_and_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_model()
    hf.save_pretrained(tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")

    bad = tmp_path / "shape"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file({**sd, "transformer.h.1.mlp.c_fc.weight": torch.zeros(32, 64)}, bad / "model.safetensors")
    msg = _err(bad)
    assert "model.safetensors" in msg and "'transformer.h.1.mlp.c_fc.weight'" in msg
    assert "(32, 64)" in msg and "(32, 128)" in msg

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if ".h.1." not in k}, partial / "model.safetensors")
    msg = _err(partial)
    assert "'transformer.h.1." in msg and "is missing" in msg and "expected shape" in msg

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors: not a readable safetensors file" in _err(trunc)

    noconf = tmp_path / "noconf"
    noconf.mkdir()
    (noconf / "model.safetensors").write_bytes(data)
    assert "config.json" in _err(noconf / "model.safetensors")

    conf = json.loads((tmp_path / "ok" / "config.json").read_text())
    for key, value, expect in (("activation_function", "relu", "activation_function is 'relu'"),
                               ("n_embd", "wide", "n_embd must be a positive integer"),
                               ("model_type", "mamba", "model_type is 'mamba'; only GPT-2 or Llama/Qwen models")):
        d = tmp_path / key
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**conf, key: value}))
        (d / "model.safetensors").write_bytes(data)
        msg = _err(d)
        assert "config.json" in msg and expect in msg

    book = book_state_dict(hf_model(tie_word_embeddings=False, n_embd=64, n_head=1))
    torch.save({k: v for k, v in book.items() if k != "trf_blocks.1.ff.layers.2.weight"}, tmp_path / "book.pth")
    msg = _err(tmp_path / "book.pth")
    assert "book.pth" in msg and "'trf_blocks.1.ff.layers.2.weight' is missing" in msg and "(64, 256)" in msg
    torch.save({**book, "trf_blocks.0.att.W_key.weight": torch.zeros(64, 32)}, tmp_path / "book2.pth")
    msg = _err(tmp_path / "book2.pth")
    assert "'trf_blocks.0.att.W_key.weight' has shape (64, 32), expected (64, 64)" in msg
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert "other.pth: a state dict of neither the book's GPTModel" in _err(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    assert "garbage.pth: not a readable PyTorch file" in _err(tmp_path / "garbage.pth")

    assert "no such file or directory" in _err(tmp_path / "nothing-here")


def test_book_head_count_must_be_given_for_odd_widths(tmp_path):
    book = book_state_dict(hf_model(tie_word_embeddings=False, n_embd=48, n_head=4))
    torch.save(book, tmp_path / "odd.pth")
    msg = _err(tmp_path / "odd.pth")
    assert "odd.pth" in msg and "--n-heads" in msg
    model, meta = load_any(tmp_path / "odd.pth", n_heads=4)
    assert model.cfg.n_heads == 4 and meta["n_heads"] == "4"


def test_tf_errors(tmp_path):
    import shutil

    d = tmp_path / "tf"
    shutil.copytree(TF_DIR, d)
    data = d / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    msg = _err(d)
    assert "model.ckpt.data-00000-of-00001" in msg and "partial data file" in msg
    (d / "hparams.json").write_text(json.dumps({"n_vocab": 64, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 12}))
    msg = _err(d)
    assert "model.ckpt.index: tensor 'model/wte' has shape (64, 8), expected (64, 16)" in msg
    (d / "hparams.json").unlink()
    assert "hparams.json" in _err(d)


# ----------------------------------------------------------------------------- CLI




def test_cli_convert_to_hf_and_back(tmp_path, capsys):
    hf = hf_model(seed=9)
    hf.save_pretrained(tmp_path / "src")
    code, out, err = run(["convert", str(tmp_path / "src"), "--to", "gptforge", str(tmp_path / "g")], capsys)
    assert code == 0, err
    code, out, err = run(["convert", str(tmp_path / "g"), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 101, (2, 10))
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    capsys.readouterr()  # transformers' progress bar above
    code, out, err = run(["convert", str(tmp_path / "g"), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 1 and "not empty (holds config.json, merges.txt, model.safetensors, ...)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    code, out, err = run(["generate", str(tmp_path / "hf"), "--prompt", "Hello"], capsys)
    assert code == 1 and "101 token ids" in err and "Traceback" not in err
    code, out, err = run(["convert", str(tmp_path / "missing"), "--to", "hf", str(tmp_path / "x")], capsys)
    assert code == 1 and err.count("\n") == 1 and "no such file or directory" in err


def test_cli_train_init_from(tmp_path, capsys, text_file):
    hf = hf_model(seed=10, vocab_size=50257, n_positions=64, n_embd=32, n_head=2, n_layer=1)
    hf.save_pretrained(tmp_path / "src")
    common = [str(text_file), "--init-from", str(tmp_path / "src"), "--max-steps", "2", "--batch-size", "2",
              "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "2", "--device", "cpu", "--no-progress"]
    code, out, err = run(["train", *common, "--context-length", "16", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    saved = (tmp_path / "run" / "config.toml").read_text()
    assert "init_from" in saved and "context_length = 16" in saved
    model, meta = load_any(tmp_path / "run")
    assert model.cfg.context_length == 16 and model.cfg.emb_dim == 32
    # two small AdamW steps away from the source's weights (a random init would be ~0.1 away)
    src = hf.transformer.wte.weight.detach()
    assert (model.wte.weight - src).abs().max() < 5e-3
    torch.testing.assert_close(model.wpe.weight, hf.transformer.wpe.weight.detach()[:16], atol=5e-3, rtol=0)
    # resuming continues from the run's own checkpoint; a different --init-from is refused
    code, out, err = run(["train", "--resume", str(tmp_path / "run"), "--max-steps", "3", "--no-progress"], capsys)
    assert code == 0 and "resuming" in out and "initialised from" not in out, err
    args = ["train", "--resume", str(tmp_path / "run"), "--init-from", "gpt2", "--max-steps", "4"]
    code, out, err = run(args, capsys)
    assert code == 1 and "cannot change init_from" in err
    code, out, err = run(["train", *common, "--n-layers", "3", "--out", str(tmp_path / "run2")], capsys)
    assert code == 1 and "--n-layers 3" in err and "has n_layers 1" in err
    code, out, err = run(["train", *common, "--context-length", "128", "--out", str(tmp_path / "run3")], capsys)
    assert code == 1 and "--context-length 128" in err
    code, out, err = run(["train", *common, "--preset", "tiny", "--out", str(tmp_path / "run4")], capsys)
    assert code == 1 and "--preset" in err

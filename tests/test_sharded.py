"""Sharded checkpoints (torch.distributed.checkpoint) in one process: the run's numbers, exact resume, background
writes, the same guarantees as single-file checkpoints (checksums, fall-back, a kill mid-write), and a sharded
checkpoint as a SOURCE for eval, generate and convert. Several processes: tests/test_scale.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from clirun import run
from rundirs import cut_after

from gptforge import checkpoint as ckpt
from gptforge.data import DataConfig
from gptforge.models.gpt2 import GPTConfig
from gptforge.models.llama import LlamaConfig
from gptforge.training import train
from gptforge.training.config import RunConfig, TrainConfig
from gptforge.weights import load_any, to_hf


def tiny(text_file, model=None, **train_kw) -> RunConfig:
    t = dict(batch_size=4, max_steps=6, eval_every=2, save_every=2, keep_last=0, eval_batches=2, log_every=1,
             sample_tokens=0, lr=2e-3, warmup_steps=1, seed=5, device="cpu", progress=False, grad_accum=2)
    t.update(train_kw)
    model = model or GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1, pad_vocab=True)
    return RunConfig(model=model, data=DataConfig(val_fraction=0.1), train=TrainConfig(**t),
                     inputs=[str(text_file)])


def records(run_dir, event="train"):
    return [(r["step"], r.get("train_loss"), r.get("grad_norm"), r.get("val_loss"))
            for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["event"] == event]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run saved whole and sharded (a padded vocabulary, tied head, dropout, grad accumulation)."""
    d = tmp_path_factory.mktemp("sharded")
    from pydoc_data.topics import topics

    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    train(tiny(text), d / "full", log=quiet)
    train(tiny(text, checkpoint_format="sharded"), d / "sharded", log=quiet)
    return d, text


def test_sharded_layout_and_same_numbers_as_full(runs):
    d, _ = runs
    assert records(d / "sharded") == records(d / "full") and records(d / "sharded", "eval") == records(d / "full",
                                                                                                        "eval")
    newest = ckpt.checkpoint_dirs(d / "sharded")[-1]
    assert ckpt.is_sharded(newest) and not (newest / ckpt.WEIGHTS).exists()
    files = json.loads((newest / ckpt.CHECKSUMS).read_text())
    assert {ckpt.META, ckpt.STATE, "shards/.metadata", "shards/__0_0.distcp"} <= set(files)
    assert "optimizer" not in ckpt.load_state(newest)  # the moments are in the shards
    meta = ckpt.read_weights_meta(newest)
    assert json.loads(meta["model"])["pad_vocab"] is True and meta["step"] == "6"
    # the weights: equal to the full checkpoint's, the padding rows cropped
    a, _ = load_any(d / "full", "cpu")
    b, meta_b = load_any(d / "sharded", "cpu")
    assert meta_b["format"] == "gptforge"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_resume_is_exact(runs, tmp_path):
    d, text = runs
    cut = cut_after(d / "sharded", tmp_path / "cut", 2)
    train(tiny(text, checkpoint_format="sharded"), cut, resume=True, log=quiet)
    assert records(cut) == records(d / "sharded")
    # and a sharded checkpoint resumes as a full-format run (the format may change on --resume)
    cut2 = cut_after(d / "sharded", tmp_path / "cut2", 4)
    train(tiny(text, checkpoint_format="full"), cut2, resume=True, log=quiet)
    assert records(cut2) == records(d / "full")
    assert not ckpt.is_sharded(ckpt.checkpoint_dirs(cut2)[-1])


def test_async_checkpoint_resumes_exactly(runs, tmp_path):
    """Background writes: the state is copied before training changes it, so each checkpoint is that step's."""
    d, text = runs
    run_dir = tmp_path / "async"
    train(tiny(text, async_checkpoint=True), run_dir, log=quiet)
    assert [c.name for c in ckpt.checkpoint_dirs(run_dir)] == [f"step-{s:08d}" for s in (2, 4, 6)]
    assert records(run_dir) == records(d / "full")
    cut = cut_after(run_dir, tmp_path / "cut", 2)
    train(tiny(text, async_checkpoint=True), cut, resume=True, log=quiet)
    assert records(cut) == records(d / "full")


def test_damaged_shard_falls_back_to_the_previous_checkpoint(runs, tmp_path, capsys):
    d, text = runs
    cut = cut_after(d / "sharded", tmp_path / "cut", 4)
    shard = ckpt.checkpoint_dirs(cut)[-1] / "shards" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    train(tiny(text, checkpoint_format="sharded"), cut, resume=True, log=quiet)
    assert "step-00000004" in capsys.readouterr().err
    assert (cut / "checkpoints" / "damaged-step-00000004").is_dir()
    assert records(cut) == records(d / "sharded")


def test_kill_while_sealing_loses_only_that_checkpoint(runs, tmp_path):
    """SIGKILL after the shards are written, before the checkpoint is sealed and renamed: the previous one is
    intact and a resume ends where the uninterrupted run did; the half-written one is cleared at the next save."""
    _, text = runs
    config = tmp_path / "config.toml"
    config.write_text(__import__("tomli_w").dumps(tiny(text, checkpoint_format="sharded").to_toml()))

    def gptforge(*args, fault=None):
        env = {k: v for k, v in os.environ.items() if k != "GPTFORGE_FAULT"}
        env.update({"GPTFORGE_FAULT": fault} if fault else {})
        return subprocess.run([sys.executable, "-m", "gptforge", "train", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=600)

    assert gptforge("--config", config, "--out", tmp_path / "ref").returncode == 0
    proc = gptforge("--config", config, "--out", tmp_path / "killed", fault="ckpt-after-shards:2")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [c.name for c in ckpt.checkpoint_dirs(tmp_path / "killed")] == ["step-00000002"]
    assert (tmp_path / "killed" / "checkpoints" / ".tmp-step-00000004").is_dir()
    proc = gptforge("--resume", tmp_path / "killed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert records(tmp_path / "killed") == records(tmp_path / "ref")
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp-*"))


def test_sharded_checkpoint_is_a_source(runs, tmp_path, capsys):
    d, text = runs
    newest = ckpt.checkpoint_dirs(d / "sharded")[-1]
    code, out, err = run(["eval", str(newest), str(text), "--max-batches", "2", "--device", "cpu"], capsys)
    code_full, out_full, _ = run(["eval", str(ckpt.checkpoint_dirs(d / "full")[-1]), str(text), "--max-batches",
                                  "2", "--device", "cpu"], capsys)
    assert code == code_full == 0, err
    assert out.strip().splitlines()[-1] == out_full.strip().splitlines()[-1]  # "loss 10.4097 | perplexity ..."
    code, out, err = run(["generate", str(d / "sharded"), "--prompt", "The", "--max-new-tokens", "5", "--device",
                          "cpu"], capsys)
    assert code == 0 and out.startswith("The"), err
    code, out, err = run(["convert", str(d / "sharded"), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    code, out, err = run(["convert", str(newest), "--to", "gptforge", str(tmp_path / "single")], capsys)
    assert code == 0, err
    single, full = load_any(tmp_path / "single", "cpu")[0].state_dict(), load_any(d / "full", "cpu")[0].state_dict()
    assert single.keys() == full.keys() and all(torch.equal(single[k], full[k]) for k in full)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = load_any(d / "full", "cpu")
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours.eval()(idx), atol=1e-4, rtol=0)


def test_llama_family_sharded(text_file, tmp_path):
    """A Muon run of the llama family (two optimizers in one checkpoint): sharded resume equals uninterrupted."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("Muon needs torch 2.9 or newer")
    model = LlamaConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
                        qk_norm=True)
    cfg = tiny(text_file, model=model, optimizer="muon", checkpoint_format="sharded", max_steps=4)
    train(cfg, tmp_path / "a", log=quiet)
    cut = cut_after(tmp_path / "a", tmp_path / "cut", 2)
    train(cfg, cut, resume=True, log=quiet)
    assert records(cut) == records(tmp_path / "a")
    a, _ = load_any(tmp_path / "a", "cpu")
    to_hf(a, tmp_path / "hf", "gpt2")  # exportable as any llama-family model
    assert (tmp_path / "hf" / "config.json").is_file()


def test_refusals(text_file, tmp_path, capsys):
    code, out, err = run(["train", str(text_file), "--out", str(tmp_path / "r"), "--async-checkpoint",
                          "--checkpoint-format", "full", "--device", "cpu"], capsys)
    assert code == 1 and "--async-checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    code, out, err = run(["train", str(text_file), "--out", str(tmp_path / "r"), "--checkpoint-format", "zip"], capsys)
    assert code != 0 and "zip" in err

"""Hugging Face tokenizers' own eos and pad tokens; --tokenizer for a model that carries none; and minimind's
tokenizer end to end: prepare a Chinese JSON Lines corpus, train a minimind-3-shaped model, generate and serve
whole characters that stop at its eos."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from clirun import run
from minimind_like import tokenizer_dir
from transformers import AutoTokenizer

from gptforge.config import ConfigError
from gptforge.generate import SampleConfig, generate
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.serve import load_engine
from gptforge.tokenizer import get_tokenizer, tokenizer_from_metadata, tokenizer_metadata
from gptforge.weights import FAMILIES, load_for_text, load_model, to_hf

MINIMIND = tokenizer_dir()  # minimind_like.py: a tokenizer with the properties of minimind's, built here
IM_END, ENDOFTEXT = 2, 0  # minimind's eos (<|im_end|>) and pad (<|endoftext|>)
DOCS = ["今天我们在河边看到了鳄鱼和麒麟。", "古代传说中有一种猛兽叫饕餮。",
        "Hello world, 深度学习 models learn from data.", "机器学习是人工智能的一个分支。"]
PROMPTS = ["今天", "古代", "Hello", "机器学习"]  # each DOCS[i]'s first tokens


def test_minimind_tokenizer_takes_eos_and_pad_from_its_config():
    tok = get_tokenizer(str(MINIMIND))
    assert get_tokenizer(str(MINIMIND / "tokenizer.json")).name == tok.name
    assert tok.vocab_size == 6400 and (tok.eot_id, tok.pad_id) == (IM_END, ENDOFTEXT)
    assert tok.stop_ids == (IM_END, ENDOFTEXT)  # <|endoftext|> is a special token: a stop too
    sha = hashlib.sha256((MINIMIND / "tokenizer.json").read_bytes()).hexdigest()[:16]
    assert tok.name == f"hf-{sha}-eos2"
    text = "Hello world! 你好，世界。"
    reference = AutoTokenizer.from_pretrained(str(MINIMIND))
    assert (reference.eos_token_id, reference.pad_token_id) == (IM_END, ENDOFTEXT)
    assert tok.encode(text) == reference.encode(text) and len(tok.encode(text)) < len(text.encode())
    assert tok.decode(tok.encode(text)) == text
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(chat) == reference.encode(chat) and tok.encode(chat)[0] == 1 and tok.encode(chat)[-1] == IM_END


def test_without_a_config_the_old_rule_and_name_stay(tmp_path):
    shutil.copy(MINIMIND / "tokenizer.json", tmp_path)
    tok = get_tokenizer(str(tmp_path))
    sha = hashlib.sha256((MINIMIND / "tokenizer.json").read_bytes()).hexdigest()[:16]
    assert tok.name == f"hf-{sha}" and tok.eot_id == ENDOFTEXT and tok.stop_ids == (ENDOFTEXT,) and tok.pad_id is None
    assert set(tokenizer_metadata(tok)) == {"tokenizer", "tokenizer_json"}
    # a config whose eos is the one the rule picks keeps the name; {"content": ...} is read like a string
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    assert get_tokenizer(str(tmp_path)).name == tok.name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert get_tokenizer(str(tmp_path)).eot_id == IM_END


def test_eos_and_pad_survive_in_checkpoint_metadata():
    tok = get_tokenizer(str(MINIMIND))
    meta = tokenizer_metadata(tok)
    assert meta["tokenizer_eos"] == "<|im_end|>" and meta["tokenizer_pad"] == "<|endoftext|>"
    back = tokenizer_from_metadata(meta)
    assert (back.name, back.eot_id, back.pad_id, back.stop_ids) == (tok.name, tok.eot_id, tok.pad_id, tok.stop_ids)
    old = tokenizer_from_metadata({k: v for k, v in meta.items() if k not in ("tokenizer_eos", "tokenizer_pad")})
    assert old.eot_id == ENDOFTEXT  # files written without tokenizer_eos keep the EOT_CANDIDATES rule


@pytest.mark.parametrize("config,message", [
    ({"eos_token": "<|nope|>"}, "eos_token '<|nope|>' is not a token of"),
    ({"pad_token": "<|nope|>"}, "pad_token '<|nope|>' is not a token of"),
    ({"eos_token": 5}, "eos_token must be a token (a string or"),
    ([1], "not a JSON object"),
    ("{", "not valid JSON"),
])
def test_a_bad_tokenizer_config_is_one_line_naming_it(tmp_path, config, message):
    shutil.copy(MINIMIND / "tokenizer.json", tmp_path)
    conf = tmp_path / "tokenizer_config.json"
    conf.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        get_tokenizer(str(tmp_path))
    assert str(e.value).startswith(str(conf)) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- --tokenizer for a bare model


@pytest.fixture(scope="module")
def bare_hf(tmp_path_factory):
    """A tiny GPT-2 with minimind's 6,400 ids as a Hugging Face directory without tokenizer files (its loader
    assumes GPT-2's 50,257-id tokenizer, which such a model cannot use)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=6400, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))
    d = to_hf(model, tmp_path_factory.mktemp("bare") / "hf")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (d / name).unlink()
    return d


def test_tokenizer_flag_on_generate_eval_and_serve(bare_hf, tmp_path, capsys):
    code, _, err = run(["generate", str(bare_hf), "--prompt", "你好", "--device", "cpu"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "6400 token ids, fewer than its gpt2 tokenizer's 50257" in err and "pass --tokenizer" in err
    code, out, err = run(["generate", str(bare_hf), "--prompt", "你好", "--max-new-tokens", "4", "--device", "cpu",
                          "--tokenizer", str(MINIMIND)], capsys)
    assert code == 0 and out.startswith("你好"), err
    code, _, err = run(["generate", str(bare_hf), "--tokenizer", "gpt2", "--device", "cpu"], capsys)
    assert code == 1 and "fewer than the --tokenizer gpt2 tokenizer's 50257" in err
    text = tmp_path / "t.txt"
    text.write_text("机器学习是人工智能的一个分支。" * 20)
    code, out, err = run(["eval", str(bare_hf), str(text), "--tokenizer", str(MINIMIND / "tokenizer.json"),
                          "--json", "--device", "cpu"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["tokens"] > 0, err
    engine = load_engine(bare_hf, "cpu", tokenizer=str(MINIMIND))
    assert engine.tokenizer.eot_id == IM_END
    code, out, _ = run(["serve", "--help"], capsys)
    assert code == 0 and "--tokenizer FILE" in out


def test_convert_stores_or_writes_the_given_tokenizer(bare_hf, tmp_path, capsys):
    from transformers import AutoTokenizer

    code, _, err = run(["convert", str(bare_hf), "--to", "gptforge", str(tmp_path / "m.safetensors"), "--tokenizer",
                        str(MINIMIND / "tokenizer.json")], capsys)
    assert code == 0, err
    _, meta = load_model(tmp_path / "m.safetensors")
    assert meta["tokenizer_eos"] == "<|im_end|>" and meta["tokenizer_pad"] == "<|endoftext|>"
    _, tok, _ = load_for_text(tmp_path / "m.safetensors")  # the checkpoint alone is enough now
    assert tok.name == get_tokenizer(str(MINIMIND)).name and tok.eot_id == IM_END

    code, _, err = run(["convert", str(bare_hf), "--to", "hf", str(tmp_path / "hf"), "--tokenizer", str(MINIMIND)],
                       capsys)
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (MINIMIND / "tokenizer.json").read_bytes()
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["eos_token_id"], conf["pad_token_id"]) == (IM_END, ENDOFTEXT)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, len(hf_tok)) == (IM_END, ENDOFTEXT, 6400)
    assert hf_tok("你好，世界。").input_ids == tok.encode("你好，世界。")
    assert get_tokenizer(str(tmp_path / "hf")).name == tok.name  # its files give gptforge the same tokenizer

    code, _, err = run(["convert", str(bare_hf), "--to", "hf", str(tmp_path / "hf2"), "--tokenizer", "gpt2"], capsys)
    assert code == 1 and "fewer than the --tokenizer gpt2 tokenizer's" in err and not (tmp_path / "hf2").exists()


# ----------------------------------------------------------------------------- minimind end to end


def memorised(model, tok) -> tuple[str, list[int], int]:
    """A prompt whose greedy continuation ends at a stop token, holds only whole characters and splits at least one
    across tokens (so the stream must hold text back); with its free-running tokens and the stop's index."""
    for prompt in PROMPTS:
        raw = generate(model, torch.tensor([tok.encode(prompt)]), SampleConfig(24))[0]  # no stop
        k = next((i for i, t in enumerate(raw) if t in tok.stop_ids), None)
        if k and "\ufffd" not in tok.decode(raw[:k]) and any(tok.decode(raw[:i]).endswith("\ufffd") for i in range(k)):
            return prompt, raw, k
    pytest.fail("the model learnt none of its documents: " + repr([tok.decode(generate(
        model, torch.tensor([tok.encode(p)]), SampleConfig(24))[0]) for p in PROMPTS]))


def serving(args: list[str]):
    """`gptforge serve ARGS --port 0` in its own process: (process, base URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "gptforge", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
            return proc, f"http://127.0.0.1:{match.group(1)}"
    proc.kill()
    pytest.fail("".join(seen))


def test_minimind_tokenizer_end_to_end(tmp_path, capsys):
    corpus, data, run_dir = tmp_path / "corpus.jsonl", tmp_path / "data", tmp_path / "run"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS * 12),
                      encoding="utf-8")
    code, _, err = run(["prepare", str(corpus), "--out", str(data), "--tokenizer", str(MINIMIND / "tokenizer.json"),
                        "--val-docs", "4", "--workers", "1", "--no-progress"], capsys)
    assert code == 0, err
    tok = get_tokenizer(str(MINIMIND))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == tok.name and (manifest["vocab_size"], manifest["eot_id"]) == (6400, 2)
    assert get_tokenizer(str(data)).name == tok.name  # the data's copy (tokenizer_config.json too) is the same
    shard = np.fromfile(data / "train-000000.bin", dtype="<u2")
    assert shard[0] == IM_END and (shard == IM_END).sum() == manifest["splits"]["train"]["documents"]

    # minimind-3's shape, tiny: 60 steps at a high rate so that it learns where its documents end
    code, out, err = run(["train", str(data), "--out", str(run_dir), "--preset", "minimind-3", "--n-layers", "1",
                          "--emb-dim", "64", "--n-heads", "4", "--n-kv-heads", "2", "--intermediate-size", "128",
                          "--context-length", "32", "--max-steps", "60", "--lr", "2e-2", "--warmup-steps", "0",
                          "--batch-size", "4", "--eval-every", "60", "--eval-batches", "1", "--sample-tokens", "4",
                          "--device", "cpu", "--no-progress", "--seed", "1"], capsys)
    assert code == 0, err
    model, tok, meta = load_for_text(run_dir)
    assert model.cfg.vocab_size == 6400 and meta["arch"] == "llama" and meta["tokenizer_eos"] == "<|im_end|>"
    prompt, raw, k = memorised(model, tok)
    assert raw[k] == IM_END
    text = tok.decode(raw[:k])

    code, out, err = run(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "24", "--device", "cpu"],
                         capsys)
    assert code == 0 and out == prompt + text + "\n", err
    assert f"generated {k + 1} tokens" in err  # stopped at the eos (counted, not printed)
    pth = tmp_path / "pretrain_64.pth"  # the same weights as a minimind state dict, which names no tokenizer
    torch.save(FAMILIES["llama"].hf_state_dict(model), pth)
    code, out, err = run(["generate", str(pth), "--prompt", prompt, "--device", "cpu"], capsys)
    assert code == 1 and "pretrain_64.pth: carries no tokenizer; pass --tokenizer" in err
    code, out, err = run(["generate", str(pth), "--tokenizer", str(MINIMIND), "--prompt", prompt, "--max-new-tokens",
                          "24", "--device", "cpu"], capsys)
    assert code == 0 and out == prompt + text + "\n", err
    code, out, err = run(["eval", str(run_dir), str(data), "--tokenizer", str(MINIMIND), "--json", "--device", "cpu",
                          "--context-length", "16"], capsys)
    assert code == 0, err
    bare = tmp_path / "bare"  # the same tokenizer.json without its config: another eos, so another tokenizer
    bare.mkdir()
    shutil.copy(MINIMIND / "tokenizer.json", bare)
    code, out, err = run(["eval", str(run_dir), str(data), "--tokenizer", str(bare), "--device", "cpu"], capsys)
    other = get_tokenizer(str(bare)).name
    assert code == 1 and f"tokenized with {tok.name}, but the model's tokenizer is {other}" in err

    proc, url = serving([str(run_dir), "--device", "cpu", "--tokenizer", str(MINIMIND)])
    try:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        finally:
            proc.kill()  # a no-op once it has exited; never leave a server behind
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    pieces = [c["text"] for c in chunks]
    assert len([p for p in pieces if p]) > 1 and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == whole["choices"][0]["text"] == text
    assert chunks[-1]["finish_reason"] == whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == k

"""GGUF files gptforge writes, run in llama.cpp itself (through llama-cpp-python): the embedded tokenizer splits
text as gptforge's does, every position's logits agree within 1e-3 (f32 weights, an f32 KV cache; the llama
family within about 1e-6, GPT-2 within about 8e-4, ggml computing GELU through an f16 table), and greedy
decoding with llama.cpp's cache gives gptforge's tokens, for a tiny GPT-2 with GPT-2's tokenizer and for tiny
llama / qwen2 / qwen3 models with a byte-level BPE trained in the test.

llama-cpp-python has no wheel for this machine and builds from its source distribution in about ten minutes
on two cores (docs/weights.md, `convert --to gguf`); the tests are skipped where it is not installed, and
marked slow, as the build is, so CI does not pay for it. Tested with llama-cpp-python 0.3.36.
"""

import numpy as np
import pytest
import torch

from gptforge.generate import SampleConfig, generate
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.models.llama import Llama, LlamaConfig
from gptforge.tokenizer import get_tokenizer, train_bpe
from gptforge.weights import to_gguf

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine; all that glitters is not gold. "
        "Pack my box with five dozen liquor jugs, and 42 more at 3.14 apiece!  Tabs\tand\nnew lines too. ")
PROMPT = "The quick brown fox jumps over"
NEW_TOKENS = 24
F32 = 0  # ggml's GGML_TYPE_F32: the KV cache in f32 (llama.cpp's default is f16)


def spread(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Weights pushed away from their small initial values, so the logits have clear maxima and norms and biases
    are not ones and zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def open_llama_cpp(path, n_ctx: int):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, type_k=F32,
                           type_v=F32, flash_attn=False, n_threads=2, verbose=False, seed=0)


def llama_cpp_greedy(llm, prompt: list[int]) -> list[int]:
    """NEW_TOKENS greedy picks with llama.cpp's own KV cache, one token per step."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def check_against_llama_cpp(tmp_path, model, tokenizer):
    path = to_gguf(model, tmp_path / "m.gguf", tokenizer)
    n_ctx = model.cfg.context_length
    llm = open_llama_cpp(path, n_ctx)
    tokens = tokenizer.encode(TEXT)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokens  # the embedded tokenizer
    assert llm.detokenize(tokens).decode() == TEXT
    tokens = tokens[: n_ctx - NEW_TOKENS]
    llm.eval(tokens)
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0].numpy()
    theirs = np.array(llm.scores[: len(tokens)])
    np.testing.assert_allclose(theirs, expected, atol=1e-3, rtol=0)
    top2 = np.sort(expected, axis=-1)[:, -2:]  # the greedy picks are no near-ties the differences could flip
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * np.abs(theirs - expected).max()
    for prompt in (tokenizer.encode(PROMPT), tokens):
        ours = generate(model, torch.tensor([prompt]), SampleConfig(max_new_tokens=NEW_TOKENS))[0]
        assert llama_cpp_greedy(llm, prompt) == ours
    llm.close()


def test_gpt2_runs_in_llama_cpp(tmp_path):
    torch.manual_seed(0)
    model = spread(GPT(GPTConfig(vocab_size=50257, context_length=96, emb_dim=64, n_heads=4, n_layers=2,
                                 qkv_bias=True)), 0.05)
    check_against_llama_cpp(tmp_path, model, get_tokenizer("gpt2"))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_llama_family_runs_in_llama_cpp(tmp_path, kind):
    tokenizer = train_bpe([TEXT * 20], 320)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, context_length=96, emb_dim=64, n_heads=4, n_kv_heads=2,
                      n_layers=2, intermediate_size=128, qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2",
                      tie_weights=kind != "llama")
    check_against_llama_cpp(tmp_path, spread(Llama(cfg), 0.05), tokenizer)



def test_mixture_of_experts_runs_in_llama_cpp_as_qwen3moe(tmp_path):
    """The qwen3moe layout of tests/test_gguf.py, run in llama.cpp (passed with llama-cpp-python 0.3.36)."""
    tokenizer = train_bpe([TEXT * 20], 320)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, context_length=96, emb_dim=64, n_heads=4, n_kv_heads=2,
                      n_layers=2, intermediate_size=128, qk_norm=True, n_experts=4, experts_per_token=2,
                      moe_intermediate_size=64)
    check_against_llama_cpp(tmp_path, spread(Llama(cfg), 0.05), tokenizer)

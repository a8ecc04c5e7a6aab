"""gptforge: pretrain GPT-2 or Llama/Qwen3-style language models from raw text."""

from .data import Batches, DataConfig, TokenWindows
from .evaluate import evaluate, perplexity
from .generate import SampleConfig, generate, sample_text
from .models import build
from .models.gpt2 import GPT, PRESETS, GPTConfig
from .models.llama import Llama, LlamaConfig
from .tokenizer import GPT2Tokenizer, Tokenizer, get_tokenizer
from .training import RunConfig, TrainConfig, train
from .weights import load_any, load_model, to_hf

__version__ = "0.1.0"
__all__ = [
    "build", "GPT", "GPTConfig", "PRESETS", "Llama", "LlamaConfig", "Tokenizer", "GPT2Tokenizer", "get_tokenizer",
    "TokenWindows", "Batches",
    "DataConfig", "evaluate", "perplexity", "SampleConfig", "generate", "sample_text", "RunConfig",
    "TrainConfig", "train", "load_model", "load_any", "to_hf",
]

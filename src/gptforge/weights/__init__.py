"""Model weights in every format gptforge reads, and out to Hugging Face.

A model SOURCE is detected, never named:

- a Hugging Face model id (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``org/name``):
  fetched into and read from ``huggingface_hub``'s cache, so it works offline once cached;
- a Hugging Face directory or weights file (``config.json`` + ``model.safetensors``, sharded
  safetensors or ``pytorch_model.bin``), read by the family whose ``model_type`` config.json names
  (GPT-2: ``Conv1D`` weights, i.e. ``(in, out)``; llama: ``llama``, ``qwen2``, ``qwen3``), with the
  ``tokenizer.json`` beside it if there is one;
- OpenAI's TensorFlow GPT-2 checkpoint directory (``hparams.json``, ``checkpoint``, ``model.ckpt.*``),
  read without TensorFlow: the ``.index`` file is a LevelDB-style table of ``BundleEntryProto``
  records that locate each variable in ``model.ckpt.data-00000-of-00001``;
- a state dict of the book's ``GPTModel`` (``tok_emb``, ``trf_blocks.N.att.W_query``, ...), bare or
  under ``"model_state_dict"``, its shape inferred from the tensors;
- nanoGPT's ``ckpt.pt`` (or its out_dir holding one): ``model`` with ``model_args``, read with
  ``weights_only`` (weights/gpt2.py ``nanogpt_source``);
- a state dict in Llama/Qwen names without a config.json (minimind's ``.pth`` files, fp16, bare or
  under ``"model"`` as in its resume files), its shape inferred from the tensors;
- a gptforge run directory, checkpoint directory or ``model.safetensors`` file (any family: the
  metadata names its ``arch``).

Every format becomes a *plan*: for each parameter of the model, the source tensors it is made from
and how (copied, transposed, concatenated). The plan is checked against the source's tensor shapes
before anything is read, so a wrong or partial file fails with one line naming the file, the
tensor and both shapes. The model is built on the meta device and its parameters are assigned one
transformer block at a time, each a fresh fp32 tensor, while the file is memory-mapped (safetensors,
torch) or read by offset (TensorFlow): the weights are never held twice.

The package: readers.py (the files), plan.py (``Entry``, ``Source``, the plan's family-free parts,
the block-by-block fill, and ``WeightFamily``: what a family's formats provide), one module of
formats per model family (gpt2.py, llama.py) listed in ``FAMILIES``, and here detection, the hub,
loading and export, which ask the family for its Hugging Face ``model_type`` values, config.json
and tensor names (both ways) and the torch state dicts it recognises.
"""

from .export import convert, convert_target, hf_config, to_gguf, to_gptforge, to_hf
from .gpt2 import BOOK_BLOCK_NAMES, BOOK_NAMES, HEAD_SIZE, HUB_NAMES, SHAPE_KEYS
from .load import (
    FAMILIES,
    HF_SHARD_INDEX,
    HF_WEIGHTS,
    LOCAL_PREFIXES,
    TORCH_SUFFIXES,
    build_model,
    check_source,
    init_model_config,
    init_moments,
    init_tokenizer,
    load_any,
    load_for_text,
    load_model,
    open_source,
    text_tokenizer,
)
from .plan import Entry, SavedMoments, Source, WeightFamily
from .readers import SafetensorsReader, TFCheckpointReader, TorchReader, WeightsError

__all__ = [
    "BOOK_BLOCK_NAMES", "BOOK_NAMES", "FAMILIES", "HEAD_SIZE", "HF_SHARD_INDEX", "HF_WEIGHTS", "HUB_NAMES",
    "LOCAL_PREFIXES", "SHAPE_KEYS", "TORCH_SUFFIXES", "Entry", "SafetensorsReader", "SavedMoments", "Source",
    "TFCheckpointReader", "TorchReader", "WeightFamily", "WeightsError", "build_model", "check_source", "convert",
    "convert_target", "hf_config", "init_model_config", "init_moments", "init_tokenizer", "load_any", "load_for_text",
    "load_model", "open_source", "text_tokenizer", "to_gguf", "to_gptforge", "to_hf",
]

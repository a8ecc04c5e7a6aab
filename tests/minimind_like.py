"""A tokenizer with the properties of minimind's, built here with Hugging Face `tokenizers` (no file copied
from minimind): a byte-level BPE of 6,400 ids (GPT-2's pre-tokenizer regex, no prefix space, no normalizer),
36 added tokens first — `<|endoftext|>` = 0 (pad and unk), `<|im_start|>` = 1 (bos), `<|im_end|>` = 2 (eos),
then minimind's other 18 special and 15 non-special ones (`<think>` …) — and a `tokenizer_config.json` that
names eos, pad and bos as minimind's does. Trained on Python's own help text and a seeded Chinese text, so it
has whole-character tokens for common Chinese characters and multi-token ones for rare characters.

`tokenizer_dir()` builds it once per process into the temporary directory (a few seconds) and returns the
directory; tests pass it, or its tokenizer.json, where a user would pass minimind's `model/` directory."""

import functools
import json
import random
import tempfile
from pathlib import Path

VOCAB_SIZE = 6400
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
           "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>"]
NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
               *(f"<|buffer{i}|>" for i in range(1, 10))]
# Chinese text to learn merges from: these sentences, often (their characters become whole tokens), and
# seeded sequences of other common characters (U+4E00 onwards), less often.
SENTENCES = ["今天我们在河边看到了鳄鱼和麒麟。", "古代传说中有一种猛兽叫饕餮。", "机器学习是人工智能的一个分支。",
             "你好，世界。", "深度学习模型从数据中学习。", "我们一起去学校读书。"]


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    rng = random.Random(0)
    common = [chr(0x4E00 + i) for i in range(600)]
    chinese = ["".join(rng.choice(common) for _ in range(40)) + "。" for _ in range(1500)]
    return list(topics.values()) + SENTENCES * 200 + chinese


def build(out: Path) -> Path:
    """Train the tokenizer and write tokenizer.json and tokenizer_config.json into OUT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(NOT_SPECIAL), special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens(NOT_SPECIAL)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
              "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "additional_special_tokens": SPECIAL[1:],
              "clean_up_tokenization_spaces": False, "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@functools.cache
def tokenizer_dir() -> Path:
    return build(Path(tempfile.mkdtemp(prefix="gptforge-minimind-like-")))

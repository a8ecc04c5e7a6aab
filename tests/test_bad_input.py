"""Every user mistake ends in one line on stderr, a non-zero exit, no traceback, and nothing lost.

Each row of CASES is one mistake: (id, command line, a fragment of the message, exit code). Every
row runs in-process in a fresh directory holding the files of `make_tree` (a user's own notes, an
empty run directory, a tiny model, ...), and after it the directory must be byte for byte as it
was: nothing written, nothing overwritten, nothing removed. The Hugging Face hub is never asked:
a SOURCE such as gpt2 proves that OUT and the flags are checked before any model is read.

Exit code 1 is gptforge's own form, one line `gptforge: error: ...`; exit code 2 is click's usage
error (`Usage: ...`, `Try ... for help.`, `Error: ...`), used only for what click itself parses
(a missing option, a choice, a value that is not a number). To add a case, add a row; to add a
file the case needs, add it to `make_tree`.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from clirun import run

from gptforge import weights
from gptforge.models.gpt2 import GPT, GPTConfig

# (id, command line, fragment of the one-line message, exit code)
CASES = [
    # train: GPTConfig, DataConfig and TrainConfig checks (nothing is read or written before them)
    ("train-min-lr-above-lr", "train --min-lr 0.01 --lr 0.001", "--min-lr 0.01 must not exceed --lr 0.001", 1),
    ("train-lr-zero", "train --lr 0", "--lr must be above 0, got 0.0", 1),
    ("train-lr-nan", "train --lr nan", "--lr must be a finite number", 1),
    ("train-weight-decay-negative", "train --weight-decay -0.1", "--weight-decay must be at least 0", 1),
    ("train-grad-clip-negative", "train --grad-clip -1", "--grad-clip must be at least 0", 1),
    ("train-beta1-one", "train --beta1 1", "--beta1 must be in [0, 1), got 1.0", 1),
    ("train-beta2-negative", "train --beta2 -0.5", "--beta2 must be in [0, 1)", 1),
    ("train-muon-lr-zero", "train --optimizer muon --muon-lr 0", "--muon-lr must be above 0, got 0.0", 1),
    ("train-muon-momentum-one", "train --optimizer muon --muon-momentum 1", "--muon-momentum must be in [0, 1)", 1),
    ("train-muon-weight-decay-negative", "train --muon-weight-decay -1", "--muon-weight-decay must be at least 0", 1),
    ("train-warmup-past-max-steps", "train --warmup-steps 10 --max-steps 5",
     "--warmup-steps 10 must not exceed --max-steps 5", 1),
    ("train-warmup-negative", "train --warmup-steps -1", "--warmup-steps must be at least 0", 1),
    ("train-batch-size-zero", "train --batch-size 0", "--batch-size must be at least 1, got 0", 1),
    ("train-grad-accum-zero", "train --grad-accum 0", "--grad-accum must be at least 1", 1),
    ("train-max-steps-zero", "train --max-steps 0", "--max-steps must be at least 1", 1),
    ("train-epochs-zero", "train --epochs 0", "--epochs must be at least 1", 1),
    ("train-eval-every-zero", "train --eval-every 0", "--eval-every must be at least 1", 1),
    ("train-eval-batches-zero", "train --eval-batches 0", "--eval-batches must be at least 1", 1),
    ("train-log-every-zero", "train --log-every 0", "--log-every must be at least 1", 1),
    ("train-save-every-zero", "train --save-every 0", "--save-every must be at least 1", 1),
    ("train-save-every-minutes-zero", "train --save-every-minutes 0", "--save-every-minutes must be above 0", 1),
    ("train-keep-last-negative", "train --keep-last -1", "--keep-last must be at least 0", 1),
    ("train-sample-tokens-negative", "train --sample-tokens -1", "--sample-tokens must be at least 0", 1),
    ("train-sample-temperature-negative", "train --sample-temperature -1", "--sample-temperature must be at least 0",
     1),
    ("train-sample-top-k-zero", "train --sample-top-k 0", "--sample-top-k must be at least 1", 1),
    ("train-seed-negative", "train --seed -1", "--seed must be in [0, 4294967295], got -1", 1),
    ("train-seed-too-large", "train --seed 18446744073709551616", "--seed must be in [0, 4294967295]", 1),
    ("train-drop-rate-one", "train --drop-rate 1", "--drop-rate must be in [0, 1), got 1.0", 1),
    ("train-n-layers-zero", "train --n-layers 0", "--n-layers must be at least 1, got 0", 1),
    ("train-emb-dim-not-divisible", "train --emb-dim 30 --n-heads 4",
     "--emb-dim 30 must be divisible by --n-heads 4", 1),
    ("train-experts-per-token-past-experts", "train --arch llama --n-experts 2 --experts-per-token 3",
     "--experts-per-token 3 must be at most --n-experts 2", 1),
    ("train-n-experts-negative", "train --arch llama --n-experts -1", "--n-experts must be at least 0", 1),
    ("train-router-aux-loss-coef-negative", "train --arch llama --n-experts 4 --router-aux-loss-coef -1",
     "--router-aux-loss-coef must be at least 0", 1),
    ("train-n-experts-gpt2", "train --arch gpt2 --n-experts 4",
     "--n-experts is a setting of the llama family, not of gpt2", 1),
    ("train-val-fraction-one", "train --val-fraction 1", "--val-fraction must be in [0, 1)", 1),
    ("train-stride-zero", "train --stride 0", "--stride must be a positive integer", 1),
    ("train-pad-with-document-mask", "train --packing pad --document-mask",
     "--document-mask is for packed windows; --packing pad holds one document per row", 1),
    ("train-pad-with-random-sampling", "train --packing pad --sampling random",
     "--packing pad has one row per document: use --sampling shuffle or sequential", 1),
    ("train-config-file-range", "train --config weight_decay.toml", "--weight-decay must be at least 0, got -1.0",
     1),
    # eval: EvalConfig, from flags or a --config file, before the model is read
    ("eval-batch-size-zero", "eval gpt2 data.txt --batch-size 0", "--batch-size must be at least 1, got 0", 1),
    ("eval-max-batches-zero", "eval gpt2 data.txt --max-batches 0", "--max-batches must be at least 1, got 0", 1),
    ("eval-stride-zero", "eval gpt2 data.txt --stride 0", "--stride must be at least 1, got 0", 1),
    ("eval-context-length-zero", "eval gpt2 data.txt --context-length 0", "--context-length must be at least 1", 1),
    ("eval-context-length-past-model", "eval model data.txt --context-length 33",
     "--context-length 33 must be between 1 and the model's 32", 1),
    ("eval-config-file-range", "eval gpt2 data.txt --config eval.toml", "--batch-size must be at least 1, got 0", 1),
    # SOURCE: a local path is never looked up on the hub (no 25 s of retries)
    # eval --task: the task's name and file, checked before the model is read (gpt2 is never fetched)
    ("eval-task-unknown", "eval gpt2 --task mmlu data.txt", "unknown task 'mmlu'; choose from hellaswag, lambada", 1),
    ("eval-task-file-missing", "eval gpt2 --task hellaswag nope.jsonl",
     "nope.jsonl: no such file; task hellaswag expects hellaswag_val.jsonl", 1),
    ("eval-task-not-json", "eval gpt2 --task lambada data.txt", "data.txt:1: not a JSON record", 1),
    ("eval-task-without-file", "eval gpt2 --task piqa --task lambada data.txt",
     "--task needs one FILE after each NAME (or NAME=FILE): 2 task(s) without one, 1 file(s) given", 1),
    ("eval-task-limit-zero", "eval gpt2 --task lambada data.txt --limit 0", "--limit must be at least 1, got 0", 1),
    ("eval-no-data-no-task", "eval gpt2", "give DATA (text files to score) or --task NAME FILE", 1),
    ("eval-num-fewshot-negative", "eval gpt2 --task lambada data.txt --num-fewshot -1",
     "--num-fewshot must be at least 0, got -1", 1),
    ("eval-fewshot-file-no-train-split", "eval gpt2 --task lambada data.txt --fewshot-file lambada=data.txt",
     "--fewshot-file 'lambada=data.txt' must be NAME=FILE with NAME one of hellaswag, arc-easy", 1),
    ("eval-suite-no-bundle", "eval gpt2 --suite core nope",
     "nope: no such directory; --suite core expects the DCLM eval bundle: core.yaml, eval_meta_data.csv", 1),
    ("eval-num-fewshot-without-task", "eval gpt2 --suite core a --num-fewshot 2",
     "--num-fewshot and --fewshot-file are for --task (a --suite's tasks give their own shots)", 1),
    ("eval-suite-two-dirs", "eval gpt2 --suite core a b", "--suite core takes one DATA, the eval bundle directory", 1),
    ("train-eval-suite-not-core", "train --eval-suite mmlu=x", "--eval-suite 'mmlu=x' must be core=DIR", 1),
    ("train-eval-task-no-file", "train --eval-task hellaswag", "--eval-task 'hellaswag' must be NAME=FILE", 1),
    ("train-eval-task-limit-zero", "train --eval-task-limit 0", "--eval-task-limit must be at least 1", 1),
    ("train-eval-task-file-missing", "train data.txt --out notes/new --eval-task lambada=nope.jsonl",
     "nope.jsonl: no such file; task lambada expects OpenAI's lambada_test.jsonl", 1),
    ("source-dir-without-checkpoints", "eval runs/x data.txt", "runs/x: a directory without checkpoints", 1),
    ("source-dot-path-missing", "eval ./runs/y data.txt", "./runs/y: no such file or directory", 1),
    ("source-under-local-dir-missing", "generate runs/y", "runs is a local directory, so runs/y is not looked up", 1),
    # generate: SampleConfig, --num-samples and --seed
    ("generate-temperature-negative", "generate gpt2 --temperature -1", "--temperature must be at least 0", 1),
    ("generate-temperature-inf", "generate gpt2 --temperature inf", "--temperature must be a finite number", 1),
    ("generate-top-k-zero", "generate gpt2 --top-k 0", "--top-k must be at least 1, got 0", 1),
    ("generate-top-p-zero", "generate gpt2 --top-p 0", "--top-p must be in (0, 1], got 0.0", 1),
    ("generate-top-p-above-one", "generate gpt2 --top-p 1.5", "--top-p must be in (0, 1]", 1),
    ("generate-max-new-tokens-negative", "generate gpt2 --max-new-tokens -1", "--max-new-tokens must be at least 0",
     1),
    ("generate-num-samples-zero", "generate gpt2 --num-samples 0", "--num-samples must be at least 1, got 0", 1),
    ("generate-seed-negative", "generate gpt2 --seed -1", "--seed must be in [0, 4294967295]", 1),
    ("generate-greedy-several-samples", "generate gpt2 --num-samples 3",
     "--num-samples 3 with greedy decoding (--temperature 0, the default) gives 3 identical samples", 1),
    # bench
    ("bench-train-steps-zero", "bench train --steps 0", "--steps must be at least 1, got 0", 1),
    ("bench-train-steps-not-a-number", "bench train --steps x", "'x' is not a valid integer", 2),
    ("bench-train-warmup-negative", "bench train --warmup -1", "--warmup must be at least 0", 1),
    ("bench-train-batch-size-zero", "bench train --batch-size 0", "--batch-size must be at least 1", 1),
    ("bench-train-not-divisible", "bench train --emb-dim 30 --n-heads 4", "must be divisible by --n-heads 4", 1),
    ("bench-train-flex-with-dropout", "bench train --preset tiny --device cpu --document-mask --attention flex",
     "--attention flex has no attention dropout: train with --drop-rate 0, or use --attention sdpa", 1),
    ("bench-train-flex-on-a-cpu", "bench train --preset tiny --drop-rate 0 --device cpu --document-mask "
     "--attention flex", "--attention flex trains on GPUs only (FlexAttention has no backward on a CPU", 1),
    ("bench-train-attention-unknown", "bench train --attention flash", "'flash' is not one of 'auto', 'sdpa', 'flex'",
     2),
    ("bench-generate-batch-size-zero", "bench generate --batch-size 0", "--batch-size must be at least 1", 1),
    ("bench-generate-prompt-tokens-zero", "bench generate --prompt-tokens 0", "--prompt-tokens 0: must be at least 1",
     1),
    ("bench-generate-max-new-tokens-one", "bench generate --max-new-tokens 1", "--max-new-tokens 1: must be at least 2",
     1),
    ("bench-generate-past-the-context", "bench generate --prompt-tokens 100 --max-new-tokens 100",
     "--prompt-tokens 100 plus --max-new-tokens 100 must fit in the context length 128", 1),
    # convert: OUT checked before the model is read; only a new or empty directory (or new file) is written
    ("convert-hf-into-users-files", "convert gpt2 --to hf notes", "OUT notes: not empty (holds mine.txt)", 1),
    ("convert-hf-over-earlier-convert", "convert gpt2 --to hf hf",
     "OUT hf: not empty (holds config.json, model.safetensors)", 1),
    ("convert-gptforge-into-users-files", "convert gpt2 --to gptforge notes", "OUT notes: not empty", 1),
    ("convert-gptforge-existing-file", "convert gpt2 --to gptforge model/model.safetensors", "already exists", 1),
    ("convert-hf-out-is-a-file", "convert gpt2 --to hf afile", "OUT afile: is a file, not a directory", 1),
    ("convert-file-under-a-file", "convert gpt2 --to gptforge afile/m.safetensors",
     "OUT afile: is a file, not a directory", 1),
    ("convert-read-only", "convert gpt2 --to hf ro/hf", "cannot write in ro", 1),
    ("convert-n-heads-zero", "convert gpt2 --to hf new --n-heads 0", "--n-heads must be at least 1, got 0", 1),
    # report: --out checked before any run is read
    ("report-out-is-a-directory", "report runs/x --out notes", "--out notes: is a directory", 1),
    ("report-over-users-file", "report runs/x --out notes/mine.txt", "exists and is not a gptforge report", 1),
    ("report-under-a-file", "report runs/x --out afile/r.html", "is a file, not a directory", 1),
    ("report-read-only", "report runs/x --out ro/r.html", "cannot write in ro", 1),
    ("report-text-file", "report data.txt", "data.txt: is a file; report takes run directories", 1),
    ("report-same-run-twice", "report runs/x runs/../runs/x", "runs/../runs/x: given twice (runs/x and "
     "runs/../runs/x are the same run); name each run once", 1),
    ("eval-empty-text-before-the-model", "eval model empty.txt", "no text found in empty.txt", 1),
    # issue 31: flags that were ignored, messages that named another cause, tracebacks
    ("train-out-of-memory", "train data.txt --out notes/new --emb-dim 200000 --n-heads 1",
     "training needs about", 1),
    ("bench-train-out-of-memory", "bench train --context-length 100000000", "training needs about", 1),
    ("train-checkpoint-without-branch", "train --resume runs/x --checkpoint 4",
     "--checkpoint 4 chooses where a branch starts (--resume RUN --out NEW)", 1),
    ("eval-split-on-text", "eval model data.txt --split train",
     "--split train chooses a split of a directory made by `gptforge prepare`", 1),
    ("eval-tokenizer-not-the-models", "eval model data.txt --tokenizer tok.json",
     "--tokenizer tok.json (300 ids) is not the tokenizer the model in model was trained with (50,257 ids)", 1),
    ("eval-task-file-twice", "eval gpt2 --task choice data.txt --task choice data.txt",
     "--task choice data.txt is given twice", 1),
    ("convert-dtype-without-gguf", "convert model --to hf new --dtype f16",
     "--dtype f16: only --to gguf writes another precision", 1),
    ("convert-n-heads-of-a-model-that-records-them", "convert model --to hf new --n-heads 4",
     "--n-heads 4: model records its heads (2)", 1),
    ("train-decay-fraction-without-wsd", "train data.txt --out notes/new --decay-fraction 0.3",
     "--decay-fraction 0.3 applies to --schedule wsd, and this run's schedule is cosine", 1),
    ("train-stride-leaves-too-few-windows", "train data.txt --out notes/new --stride 1000 --context-length 16",
     "starting 1000 tokens apart (--stride 1000), fewer than one batch of 8; give more text, lower --stride", 1),
    ("train-config-key-in-another-table", "train --config wrong_table.toml",
     "wrong_table.toml: 'lr' belongs in [train], not in [model]; move it there", 1),
    ("eval-arguments-swapped", "eval data.txt model", "SOURCE data.txt: a text file, not a model", 1),
    ("convert-without-out", "convert model --to hf", "no OUT given: say where to write", 1),
    ("convert-out-twice", "convert model new --to hf --out other", "OUT is given twice (new and --out other)", 1),
    ("train-init-from-pth-without-its-tokenizer", "train data.txt --out notes/new --init-from mm.pth",
     "--init-from mm.pth: carries no tokenizer and has 300 token ids, fewer than gpt2 (assumed) has (50,257); pass "
     "--tokenizer", 1),
    ("train-init-from-pth-with-a-larger-tokenizer",
     "train data.txt --out notes/new --init-from mm.pth --tokenizer gpt2",
     "fewer than --tokenizer gpt2 has (50,257)", 1),
    ("tokenizer-min-frequency-negative", "tokenizer train data.txt --vocab-size 300 --out notes/tok --min-frequency -3",
     "--min-frequency must be at least 0, got -3", 1),
]


def make_tree(root: Path, model_bytes: bytes, tok_json: str, pth_bytes: bytes) -> None:
    """The files a user has where the commands run."""
    (root / "tok.json").write_text(tok_json)
    (root / "mm.pth").write_bytes(pth_bytes)
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("my own notes\n")
    (root / "runs" / "x").mkdir(parents=True)
    (root / "afile").write_text("a file, not a directory\n")
    (root / "data.txt").write_text("Every effort moves you. " * 50)
    (root / "empty.txt").write_text("")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}\n")  # what an earlier convert --to hf left
    (root / "hf" / "model.safetensors").write_bytes(b"weights of an earlier convert")
    (root / "model").mkdir()
    (root / "model" / "model.safetensors").write_bytes(model_bytes)
    (root / "weight_decay.toml").write_text("[train]\nweight_decay = -1\n")
    (root / "eval.toml").write_text("batch_size = 0\n")
    (root / "wrong_table.toml").write_text("[model]\nlr = 0.001\n")
    (root / "ro").mkdir()
    (root / "ro" / "kept.txt").write_text("kept\n")
    (root / "ro").chmod(0o555)


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A tiny gptforge model that reads GPT-2 text (full vocabulary, 32 positions)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    path = weights.to_gptforge(model, tmp_path_factory.mktemp("model") / "m.safetensors")
    return path.read_bytes()


@pytest.fixture(scope="module")
def pth_bytes(tmp_path_factory) -> bytes:
    """A minimind-style .pth (a bare Qwen3 state dict in fp16, no tokenizer) of 300 token ids."""
    import transformers

    torch.manual_seed(0)
    conf = transformers.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    tie_word_embeddings=True, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("pth") / "mm.pth"
    torch.save({k: v.half() for k, v in transformers.Qwen3ForCausalLM(conf).state_dict().items()}, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def tok_json() -> str:
    """A 300-id byte-level BPE: another tokenizer than the model's GPT-2."""
    from pydoc_data.topics import topics

    from gptforge.tokenizer import train_bpe

    tok = train_bpe([topics[k] for k in sorted(topics)[:5]], 300)
    assert tok.vocab_size == 300
    return tok.json


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def no_hub(repo_id):
    raise AssertionError(f"the Hugging Face hub was asked for {repo_id!r}")


@pytest.mark.parametrize("args,fragment,code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_nothing_is_lost(args, fragment, code, tmp_path, capsys, monkeypatch, model_bytes,
                                                  tok_json, pth_bytes):
    make_tree(tmp_path, model_bytes, tok_json, pth_bytes)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights.load, "_hub_snapshot", no_hub)
    immutable = "ro/" in args and os.geteuid() == 0  # root writes anywhere, except into an immutable directory
    if immutable and subprocess.run(["chattr", "+i", "ro"], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i to make a directory read-only for root")
    before = snapshot(tmp_path)
    try:
        got, _, err = run(shlex.split(args), capsys)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", "ro"], check=True)
    assert got == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2:  # click's usage error
        assert len(lines) == 3 and lines[0].startswith("Usage: gptforge") and lines[-1].startswith("Error: "), err
    else:
        assert len(lines) == 1 and lines[0].startswith("gptforge: error: "), err
    assert fragment in lines[-1]
    assert snapshot(tmp_path) == before

import json
import math
import re
import subprocess
import sys

import click
import pytest
from clirun import run

TINY = ["--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--eval-batches", "2",
        "--sample-tokens", "4", "--device", "cpu", "--no-progress", "--seed", "1"]




@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    """One tiny run shared by the eval/generate tests."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("cli")
    text = d / "corpus.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    proc = subprocess.run(
        [sys.executable, "-m", "gptforge", "train", str(text), "--out", str(d / "run"), "--max-steps", "6",
         "--eval-every", "3", *TINY],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return d / "run", text, proc.stdout


def test_train_end_to_end(trained):
    run_dir, _, stdout = trained
    assert "parameters" in stdout and "MB in fp32" in stdout
    assert "sample: 'Every effort moves you" in stdout
    assert "done: step 6" in stdout and "val_bpb " in stdout
    assert re.search(r"step 6 \| tokens 768 \| train loss [\d.]+ \(bpb [\d.]+\) \| val loss [\d.]+ "
                     r"\(ppl [\d.]+, bpb [\d.]+\)", stdout)
    for name in ("config.toml", "metrics.jsonl", "loss.png", "checkpoints/step-00000006/model.safetensors",
                 "checkpoints/step-00000006/state.pt"):
        assert (run_dir / name).is_file(), name


def test_eval_json(trained, capsys):
    run_dir, text, _ = trained
    code, out, _ = run(["eval", str(run_dir), str(text), "--json", "--device", "cpu"], capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"loss", "perplexity", "bpb", "tokens"}
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert result["tokens"] % 32 == 0 and result["tokens"] > 1000
    # bpb: the scored targets (every token after the first, one document) are this many bytes of the text
    from gptforge.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    scored = tok.encode(text.read_text(encoding="utf-8"))[1: result["tokens"] + 1]
    n_bytes = len(tok.decode(scored).encode("utf-8"))
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / n_bytes, rel=1e-9)
    assert f"bpb {result['bpb']:.4f} | tokens" in out
    # a shorter context and a stride score more windows; a checkpoint file works as SOURCE
    weights = run_dir / "checkpoints/step-00000006/model.safetensors"
    code, out, _ = run(["eval", str(weights), str(text), "--json", "--context-length", "16", "--stride", "8",
                        "--max-batches", "3", "--batch-size", "2"], capsys)
    # sliding windows: the first scores its 16 tokens, each of the 5 others the 8 its stride adds (scored once)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["tokens"] == 16 + 5 * 8


def test_generate_seeded_and_greedy(trained, capsys):
    run_dir, _, _ = trained
    args = ["generate", str(run_dir), "--prompt", "The", "--max-new-tokens", "8", "--device", "cpu"]
    a = run(args + ["--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--seed", "3",
                    "--num-samples", "2"], capsys)
    b = run(args + ["--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--seed", "3",
                    "--num-samples", "2"], capsys)
    assert a[0] == 0 and a[1] == b[1] and a[1].count("--- sample") == 2
    g1, g2 = run(args, capsys), run(args + ["--top-k", "1", "--temperature", "0.7", "--seed", "9"], capsys)
    assert g1[1] == g2[1] and g1[1].startswith("The")
    assert "generated 8 tokens in" in g1[2] and "tokens/s" in g1[2]  # speed on stderr, text alone on stdout


def test_generate_ctrl_c_keeps_the_text_so_far(trained, capsys, monkeypatch):
    """Ctrl-C during generation prints the tokens generated before it (the same as a shorter run's) and exits 130."""
    import importlib

    gen = importlib.import_module("gptforge.generate")  # the module (the package also exports a function so named)
    run_dir, _, _ = trained
    args = ["generate", str(run_dir), "--prompt", "The", "--device", "cpu"]
    code, five, _ = run(args + ["--max-new-tokens", "5"], capsys)
    assert code == 0
    decode, calls = gen.decode_one_token, []

    def interrupted_after_four(*a, **k):  # the prefill gives token 1, decode steps 2-5, then Ctrl-C
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return decode(*a, **k)

    monkeypatch.setattr(gen, "decode_one_token", interrupted_after_four)
    code, out, err = run(args + ["--max-new-tokens", "50"], capsys)
    assert code == 130 and out == five
    assert "generated 5 tokens" in err and "interrupted" in err and "Traceback" not in err


def test_resume_extends_a_finished_run(trained, capsys, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    code, _, err = run(["train", "--resume", str(run_dir)], capsys)
    assert code == 1 and "already finished at step 6" in err and "--max-steps" in err
    code, out, _ = run(["train", "--resume", str(run_dir), "--max-steps", "8", "--no-progress"], capsys)
    assert code == 0 and "resuming" in out and "done: step 8" in out
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert max(steps) == 8
    code, _, err = run(["train", "--resume", str(run_dir), "--max-steps", "9", "--emb-dim", "128"], capsys)
    assert code == 1 and "cannot change emb_dim" in err


def test_config_file_and_flags_win(tmp_path, capsys, text_file):
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "tiny"\nmax-steps = 2\n[train]\nlr = 0.01\nbatch_size = 2\neval_every = 1\n'
                   'device = "cpu"\nprogress = false\nsample_tokens = 0\n[model]\ncontext_length = 16\n')
    code, out, err = run(["train", str(text_file), "--config", str(cfg), "--out", str(tmp_path / "r"),
                          "--lr", "0.02"], capsys)
    assert code == 0, err
    import tomllib

    saved = tomllib.loads((tmp_path / "r" / "config.toml").read_text())
    assert saved["train"]["lr"] == 0.02 and saved["train"]["batch_size"] == 2 and saved["train"]["max_steps"] == 2
    assert saved["model"]["context_length"] == 16 and saved["model"]["emb_dim"] == 64  # preset tiny
    assert saved["arch"] == "gpt2" and next(iter(saved)) == "arch"
    # the saved config is itself a valid --config
    code, _, err = run(["train", "--config", str(tmp_path / "r" / "config.toml"), "--out", str(tmp_path / "r2")],
                       capsys)
    assert code == 0, err


@pytest.mark.parametrize("toml,message", [
    ("lrr = 0.1\n", "unknown key 'lrr' in the top level; did you mean 'lr'?"),
    ("[train]\nlr = 'fast'\n", "lr must be a number, got 'fast'"),
    ("[optim]\nlr = 1\n", "unknown table [optim]"),
    ("lr = \n", "not valid TOML"),
    ('arch = "mamba"\n', "unknown arch 'mamba'; known model families: gpt2, llama"),
])
def test_bad_config_files(tmp_path, capsys, toml, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    code, _, err = run(["train", "--config", str(cfg)], capsys)
    assert code == 1 and message in err and "Traceback" not in err
    assert str(cfg) in err


def test_user_errors_are_one_line(tmp_path, capsys, text_file):
    short = tmp_path / "short.txt"
    short.write_text("just a few words here")
    cases = [
        (["train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")], "no such file"),
        (["train", str(short), "--out", str(tmp_path / "b"), *TINY], "train split has"),
        (["train", str(text_file), "--emb-dim", "30", "--n-heads", "4", "--out", str(tmp_path / "c")],
         "divisible"),
        (["eval", str(tmp_path / "nothing"), str(text_file)], "no such file"),
        (["generate", str(text_file), "--prompt", "x"], "a text file, not a model"),
    ]
    for args, message in cases:
        code, _, err = run(args, capsys)
        assert code == 1, args
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_out_dir_with_a_run_is_not_overwritten(trained, capsys):
    run_dir, text, _ = trained
    before = (run_dir / "metrics.jsonl").read_bytes()
    code, _, err = run(["train", str(text), "--out", str(run_dir), *TINY], capsys)
    assert code == 1 and "already holds a run" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_help_explains_every_flag(capsys):
    import click

    from gptforge.cli import cli

    def walk(group, path):
        for name, command in group.commands.items():
            yield [*path, name], command
            if isinstance(command, click.Group):
                yield from walk(command, [*path, name])

    seen = []
    for path, command in walk(cli, []):
        code, out, _ = run([*path, "--help"], capsys)
        assert code == 0 and out.startswith(f"Usage: gptforge {' '.join(path)} "), path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, (path, param.name)
                assert param.opts[0] in out, (path, param.opts[0])
        seen.append(" ".join(path))
    assert {"train", "eval", "bench", "bench train", "bench generate", "tokenizer", "tokenizer train"} <= set(seen)
    code, out, _ = run(["train", "--help"], capsys)
    for flag in ("--val-fraction", "--stride", "--warmup-steps", "--min-lr", "--grad-clip", "--grad-accum",
                 "--epochs", "--max-steps", "--eval-every", "--eval-batches", "--sample-prompt", "--seed",
                 "--device", "--preset", "--context-length", "--emb-dim", "--n-layers", "--n-heads",
                 "--drop-rate", "--qkv-bias", "--batch-size", "--lr", "--weight-decay", "--resume", "--config",
                 "--out"):
        assert flag in out, flag
    flat = " ".join(out.split())  # click wraps the help text
    for flag, default in (("--optimizer [adamw|muon]", "adamw"), ("--muon-lr FLOAT", "0.02"),
                          ("--muon-momentum FLOAT", "0.95"), ("--muon-weight-decay FLOAT", "0.01"),
                          ("--muon-nesterov / --no-muon-nesterov", "True"),
                          ("--weight-decay-on [matrices|all]", "matrices")):
        assert flag in flat, flag
        after = flat[flat.index(flag):]
        assert after[after.index("[default: "):].startswith(f"[default: {default}]"), flag  # its own default


def test_command_flags_are_the_component_dataclasses_fields(capsys):
    """eval, generate, serve and bench take their flags from the dataclasses their modules own."""
    from dataclasses import fields

    from gptforge.bench import BenchConfig
    from gptforge.evaluate import EvalConfig
    from gptforge.generate import GenerateConfig, SampleConfig
    from gptforge.serve import ServeConfig

    wanted = {("eval",): [f.name for f in fields(EvalConfig)],
              ("generate",): [f.name for cls in (GenerateConfig, SampleConfig) for f in fields(cls)],
              ("serve",): [f.name for f in fields(ServeConfig)],
              ("bench", "train"): ["steps", "warmup", "profile", "document_mask"],
              ("bench", "generate"): ["max_new_tokens", "prompt_tokens"]}
    assert set(wanted[("bench", "train")] + wanted[("bench", "generate")]) == {f.name for f in fields(BenchConfig)}
    for path, names in wanted.items():
        code, out, _ = run([*path, "--help"], capsys)
        assert code == 0
        for name in names:
            assert "--" + name.replace("_", "-") in out, (path, name)


def leaf_commands(group=None, prefix=()):
    from gptforge.cli import cli

    group = group or cli
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


POSITIONALS = {"eval": ["gpt2", "t.txt"], "generate": ["gpt2"], "serve": ["gpt2"], "convert": ["gpt2", "out"],
               "report": ["runs/x"], "prepare": ["t.txt"], "tokenizer train": ["t.txt"]}


def test_every_command_reads_a_config_file(tmp_path, capsys, monkeypatch):
    """Each command takes --config FILE (prepare: a .toml given to its --config): a key no option has is refused
    naming the file, before any work; a key it has is applied (options on the command line win)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("no_such_setting = 1\n")
    commands = dict(leaf_commands())
    assert {"train", "eval", "generate", "serve", "convert", "report", "prepare", "plan"} <= {" ".join(k) for k in
                                                                                            commands}
    for path in commands:
        name = " ".join(path)
        code, _, err = run([*path, *POSITIONALS.get(name, []), "--config", "bad.toml"], capsys)
        assert code == 1 and "bad.toml" in err and "no_such_setting" in err, (name, err)
    (tmp_path / "t.txt").write_text("Every effort moves you. " * 200)
    (tmp_path / "tok.toml").write_text('vocab-size = 300\nout = "tok"\n')  # required options, from the file
    code, out, err = run(["tokenizer", "train", "t.txt", "--config", "tok.toml"], capsys)
    assert code == 0 and (tmp_path / "tok" / "tokenizer.json").is_file(), err
    (tmp_path / "serve.toml").write_text("port = 99999\n")
    assert "--port must be between 0 and 65535, got 99999" in run(["serve", "gpt2", "--config", "serve.toml"],
                                                                   capsys)[2]
    (tmp_path / "plan.toml").write_text("minutes = -1\n")
    assert "--minutes must be above 0, got -1.0" in run(["plan", "t.txt", "--config", "plan.toml"], capsys)[2]
    assert "--minutes must be above 0, got -2.0" in run(["plan", "t.txt", "--config", "plan.toml", "--minutes", "-2"],
                                                        capsys)[2]  # the command line wins
    (tmp_path / "prep.toml").write_text('workers = -2\nout = "d"\n')
    assert "--workers must be 0 (all cores) or more, got -2" in run(["prepare", "t.txt", "--config", "prep.toml"],
                                                                    capsys)[2]

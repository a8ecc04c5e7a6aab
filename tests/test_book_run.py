"""`gptforge train --recipe book` step for step against the book's chapter-5 run (benchmarks/book_side_by_side.py's
reference model, written in the book's structure), and --init-from the book's model_and_optimizer.pth."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from clirun import run

from gptforge.training.optim import build_optimizer
from gptforge.training.state import RunState, TrainData, adopt_moments, build_model
from gptforge.training.step import Precision, train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from book_side_by_side import BookGPT, GptforgeSide, gptforge_run_config, largest_difference, ref_step  # noqa: E402

SMALL = {"emb_dim": 64, "n_layers": 2, "n_heads": 2, "context_length": 16, "drop_rate": 0.0, "vocab_size": 512}


@pytest.fixture
def text(tmp_path) -> str:
    path = tmp_path / "story.txt"
    path.write_text("I had always thought Jack Gisburn rather a cheap genius. " * 40)
    return str(path)


def book_cfg(m, same_masks: bool = True) -> dict:
    return dict(vocab_size=m.vocab_size, context_length=m.context_length, emb_dim=m.emb_dim, n_heads=m.n_heads,
                n_layers=m.n_layers, drop_rate=m.drop_rate, qkv_bias=m.qkv_bias, same_masks=same_masks)


def batches(cfg, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.train.batch_size, cfg.model.context_length)
    return [tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=g) for _ in "xy") for _ in range(n)]


def both_runs(cfg, steps: list) -> tuple[list[float], list[float], float]:
    """The reference (torch.manual_seed(123), the book's AdamW) and gptforge (the same initial weights, its training
    step), on the same batches; with dropout, the same masks (the same RNG state before each step). Returns both
    sides' losses and the largest difference of any weight at the end."""
    torch.manual_seed(123)
    ref = BookGPT(book_cfg(cfg.model))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ours = GptforgeSide.build(cfg, ref)
    ref.train()
    losses_ref, losses_ours = [], []
    for x, y in steps:
        rng = torch.get_rng_state()
        losses_ref.append(ref_step(ref, ref_opt, x, y)[0])
        torch.set_rng_state(rng)
        losses_ours.append(ours.step(x, y).loss)
    return losses_ref, losses_ours, largest_difference(ref, ours.model)[0]


def test_recipe_book_steps_equal_the_books_run(text):
    cfg = gptforge_run_config(text, SMALL)
    m, t = cfg.model, cfg.train
    assert (m.qkv_bias, m.tie_weights, t.init, t.grad_clip) == (False, False, "torch", 0)
    assert cfg.data.val_split == "characters"
    ref, ours, weights = both_runs(cfg, batches(cfg, 2) * 3)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), atol=1e-5, rtol=0)
    assert ref[-1] < ref[0] - 0.1  # the steps learn (the batches again and again): not equal constants
    assert weights < 1e-5


def test_recipe_book_steps_equal_with_dropout_and_the_same_masks(text):
    cfg = gptforge_run_config(text, {**SMALL, "drop_rate": 0.1})
    ref, ours, weights = both_runs(cfg, batches(cfg, 4))
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), atol=1e-5, rtol=0)
    assert weights < 1e-5


@pytest.mark.parametrize("change", [{"beta2": 0.95}, {"weight_decay_on": "matrices"}, {"lr": 5e-4}])
def test_the_comparison_can_fail(text, change):
    """Another optimizer setting on gptforge's side (nanoGPT's beta2, no decay of norms and biases, the script's lr
    rather than the notebook's) parts the weights within a few steps."""
    cfg = gptforge_run_config(text, {**SMALL, **change})
    torch.manual_seed(123)
    ref = BookGPT(book_cfg(cfg.model))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=4e-4, weight_decay=0.1)  # the notebook's
    ours = GptforgeSide.build(cfg, ref)
    for x, y in batches(cfg, 3):
        ref_step(ref, ref_opt, x, y), ours.step(x, y)
    assert largest_difference(ref, ours.model)[0] > 1e-5


# ----------------------------------------------------------------------------- the chapter's model_and_optimizer.pth


def book_file(tmp_path, cfg, steps) -> tuple[Path, BookGPT, torch.optim.Optimizer]:
    """A reference model trained a few steps, saved as the chapter saves it."""
    torch.manual_seed(123)
    ref = BookGPT(book_cfg(cfg.model))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    for x, y in steps:
        ref_step(ref, ref_opt, x, y)
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": ref.state_dict(), "optimizer_state_dict": ref_opt.state_dict()}, path)
    return path, ref, ref_opt


def continue_from(path: Path, text: str, flags: dict, steps, warn) -> list[float]:
    """gptforge's run from --init-from FILE (as train() sets it up: model, optimizer, the file's moments), on steps."""
    from gptforge.training.config import resolve_train_config

    cfg, _ = resolve_train_config([text], None, None, None, {"out": str(path.parent / "run"), **flags},
                                  init_from=str(path), recipe="book")
    device = torch.device("cpu")
    model = build_model(cfg, device, False, lambda *a: None)
    optimizer = build_optimizer(model, cfg.train, device)
    adopt_moments(cfg, model, optimizer, warn)
    amp, state, losses = Precision("fp32", device), RunState(), []
    for x, y in steps:
        data = TrainData(_Fixed(x, y), {}, "", "")
        losses.append(train_step(model, model, optimizer, amp, cfg.train, data, state, device, [], False).loss)
    return losses


class _Fixed:
    def __init__(self, x, y):
        self.xy = (x, y)

    def __len__(self):
        return 1

    def batch(self, epoch, b):
        return self.xy


BOOK_SHAPE = {"emb_dim": 64, "n_layers": 2, "n_heads": 1, "context_length": 16, "drop_rate": 0.0}  # head size 64


def test_init_from_the_books_file_continues_its_adamw_moments(tmp_path, text):
    cfg = gptforge_run_config(text, BOOK_SHAPE)  # GPT-2's 50,257 ids: a book file's tokenizer is gpt2
    steps = batches(cfg, 7, seed=1)
    path, ref, ref_opt = book_file(tmp_path, cfg, steps[:4])
    later = [ref_step(ref, ref_opt, x, y)[0] for x, y in steps[4:]]  # the reference goes on
    said = []
    ours = continue_from(path, text, {"drop_rate": 0.0}, steps[4:], said.append)
    assert len(said) == 1 and "kept its AdamW moments" in said[0] and "step 4" in said[0], said
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(later), atol=1e-5, rtol=0)
    said.clear()
    fresh = continue_from(path, text, {"drop_rate": 0.0, "beta2": 0.95}, steps[4:], said.append)
    assert "betas (0.9, 0.999) are not the run's (0.9, 0.95)" in said[0] and "fresh moments" in said[0], said
    assert abs(fresh[1] - later[1]) > 1e-4  # fresh moments: another run


def test_init_from_says_fresh_moments_for_weights_alone(tmp_path, text, capsys):
    cfg = gptforge_run_config(text, BOOK_SHAPE)
    torch.manual_seed(0)
    path = tmp_path / "model.pth"
    torch.save(BookGPT(book_cfg(cfg.model)).state_dict(), path)
    code, _, err = run(["train", text, "--init-from", str(path), "--recipe", "book", "--max-steps", "1",
                        "--batch-size", "1", "--out", str(tmp_path / "run"), "--sample-tokens", "0", "--no-progress"],
                       capsys)
    assert code == 0, err
    assert f"--init-from {path}: it holds no optimizer state; AdamW starts with fresh moments" in err


@pytest.mark.parametrize("optimizer_state", [[1, 2], {"state": {}}, {"state": [], "param_groups": [{"params": [0]}]}])
def test_init_from_a_damaged_optimizer_state_says_fresh_moments(tmp_path, text, optimizer_state):
    cfg = gptforge_run_config(text, BOOK_SHAPE)
    torch.manual_seed(0)
    path = tmp_path / "model_and_optimizer.pth"
    torch.save({"model_state_dict": BookGPT(book_cfg(cfg.model)).state_dict(),
                "optimizer_state_dict": optimizer_state}, path)
    said = []
    continue_from(path, text, {"drop_rate": 0.0}, [], said.append)
    assert len(said) == 1 and "AdamW starts with fresh moments" in said[0], said

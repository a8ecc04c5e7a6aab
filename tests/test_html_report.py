"""`gptforge report`: one self-contained HTML file, checked as text and rendered in headless Chromium."""

import json
import math
import re

import pytest
from browser import browser  # noqa: F401  (fixture)

from gptforge.cli import main
from gptforge.runs.metrics import plot_losses
from gptforge.runs.report import load_runs, render, write_report


def make_run(path, lr: float, steps: int = 20, tokens_per_step: int = 256, sample_tag: str = "a", bpb: bool = False):
    """A run directory as `gptforge train` leaves it: config.toml and metrics.jsonl (with bpb: as runs
    write it since bits per byte; without: as older runs did)."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(
        f'preset = "tiny"\ninputs = ["books/"]\n[model]\nemb_dim = 64\nn_layers = 2\n'
        f"[train]\nlr = {lr}\nbatch_size = 8\nmax_steps = {steps}\n")
    lines = []
    for step in range(0, steps + 1):
        if step % 5 == 0:
            val = 10 - step * lr * 10
            lines.append({"event": "eval", "step": step, "tokens": step * tokens_per_step, "lr": lr,
                          "train_loss": val - 0.1, "val_loss": val, "val_perplexity": math.exp(val),
                          "sample": f"<b>{sample_tag}</b> sample at {step}"})
            if bpb:
                lines[-1].update(train_bpb=(val - 0.1) / 3, val_bpb=val / 3)
        if step and step % 2 == 0:
            lines.append({"event": "train", "step": step, "tokens": step * tokens_per_step, "lr": lr * step / steps,
                          "train_loss": 10 - step * lr * 9, "grad_norm": 1.5, "tokens_per_s": 1000.0 + step})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "tra')
    return path


@pytest.fixture
def two_runs(tmp_path):
    return [make_run(tmp_path / "fast", 0.02, sample_tag="fast"), make_run(tmp_path / "slow", 0.01, sample_tag="slow")]


def test_report_holds_plots_tables_and_samples(two_runs):
    page = render(load_runs(two_runs))
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 6 and all(len(i) > 1000 for i in images)
    for caption in ("Loss against steps", "Loss against tokens seen", "Learning-rate schedule", "Throughput"):
        assert caption in page
    # configs side by side: exactly the differing rows are highlighted
    diff_rows = re.findall(r"<tr class=diff><td>([^<]+)</td>", page)
    assert diff_rows == ["train.lr"]
    assert "<td>model.emb_dim</td><td>64</td><td>64</td>" in page
    # samples, escaped, at each evaluation of each run
    assert page.count("&lt;b&gt;fast&lt;/b&gt; sample at") == 5 and "<b>fast</b>" not in page
    # final results: last step, tokens, losses and perplexity of the last evaluation
    summary = re.search(r'<table id="summary">(.*?)</table>', page, re.S).group(1)
    assert "<td>fast</td>" in summary and '<td class="num">20</td>' in summary and "5,120" in summary
    assert f"{math.exp(6.0):.4g}" in summary  # fast: val loss 10 - 20 * 0.02 * 10 = 6


def test_bits_per_byte_in_the_report_and_loss_png(tmp_path):
    new, old = make_run(tmp_path / "new", 0.02, bpb=True), make_run(tmp_path / "old", 0.01)
    page = render(load_runs([new, old]))
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 7 and "Bits per byte against steps" in page
    summary = re.search(r'<table id="summary">(.*?)</table>', page, re.S).group(1)
    assert "<th>val bpb</th>" in summary and f'<td class="num">{6.0 / 3:.4g}</td>' in summary
    assert summary.count('<td class="num">—</td>') == 2  # the older run has no bpb, so no best bpb either
    assert "Bits per byte" not in render(load_runs([old]))  # an older run alone: no bpb plot, no error

    def png_width(records) -> int:
        plot_losses(records, tmp_path / "loss.png")
        return int.from_bytes((tmp_path / "loss.png").read_bytes()[16:20], "big")

    assert png_width(load_runs([new])[0].records) == 1200 and png_width(load_runs([old])[0].records) == 700


def test_the_best_evaluation_is_in_the_summary_with_its_checkpoint(tmp_path):
    """A run whose val loss rises after step 10: its best step, loss and kept checkpoint (best.json) are shown."""
    run = make_run(tmp_path / "rising", 0.02, bpb=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    for r in records:
        if r["event"] == "eval" and r["step"] > 10:
            r["val_loss"] = 8.0 + r["step"] / 10
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "best.json").write_text(json.dumps({"step": 10, "val_loss": 8.0, "checkpoint": "checkpoints/step-00000010"}))
    summary = re.search(r'<table id="summary">(.*?)</table>', render(load_runs([run])), re.S).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", summary)
    assert cells[-4:] == ["10", "8", f"{8.0 / 3:.4g}", "checkpoints/step-00000010"]


def test_same_directory_names_are_told_apart(tmp_path):
    a = make_run(tmp_path / "x" / "run", 0.01)
    b = make_run(tmp_path / "y" / "run", 0.02)
    names = [r.name for r in load_runs([a, b])]
    assert names == [str(a), str(b)]


def test_cli_report(two_runs, tmp_path, capsys):
    out = tmp_path / "out" / "compare.html"
    main(["report", *map(str, two_runs), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out and out.read_text().startswith("<!DOCTYPE html>")
    main(["report", str(two_runs[0])])  # one run: report.html inside it
    assert (two_runs[0] / "report.html").is_file()
    main(["report", *map(str, two_runs), "--out", str(out)])  # an earlier report is replaced; other files never are
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1


def test_report_renders_in_chromium(two_runs, tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    out = write_report(two_runs, tmp_path / "report.html")
    browser.get(out.as_uri())
    assert browser.title == "gptforge report: fast, slow"
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 6
    for img in images:  # every plot decoded into a picture of the size matplotlib drew
        width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert (width, height) == (630, 324)
    rows = browser.find_elements(By.CSS_SELECTOR, "#config tr.diff")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["train.lr"]
    highlight = rows[0].find_element(By.TAG_NAME, "td").value_of_css_property("background-color")
    plain = browser.find_element(By.CSS_SELECTOR, "#config tr:not(.diff) td").value_of_css_property(
        "background-color")
    assert highlight != plain
    summary = browser.find_elements(By.CSS_SELECTOR, "#summary tr")
    assert len(summary) == 3 and summary[1].find_elements(By.TAG_NAME, "td")[0].text == "fast"
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.samples tr")) == 2 * (5 + 1)
    assert "<b>slow</b> sample at 20" in browser.find_element(By.TAG_NAME, "body").text

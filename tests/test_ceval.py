"""C-Eval and CMMLU: subjects synthesised in the published CSV layouts, scored by gptforge and by
lm-evaluation-harness's own `ceval-valid_SUBJECT` / `cmmlu_SUBJECT` configs (the data files swapped for ours) on
the same exported models (minimind's tokenizer among them), at 0 and 5 shots: per-item log-likelihoods within
1e-4, each subject's acc and the size-weighted group acc identical."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from test_fewshot import LONG, long_hf  # noqa: F401
from test_tasks import assert_same_lls

from gptforge.data import DataError
from gptforge.evaluate.tasks import PreparedTask, read_task, score_task, task_items
from gptforge.weights import load_for_text

QUESTIONS = [
    ("下列哪一项是水的化学式？", "H2O", "CO2", "NaCl", "O2", "A"),
    ("中国的首都是哪座城市？", "上海", "北京", "广州", "深圳", "B"),
    ("一年有多少个月？", "十个", "十一个", "十二个", "十三个", "C"),
    ("太阳从哪个方向升起？  ", "西方", "南方", "北方", "东方", "D"),
    ("以下哪种动物会飞？", "麻雀", "鲸鱼", "老虎", "蛇", "A"),
    ("三角形有几条边？", "两条", "三条", "四条", "五条", "B"),
    ("植物进行光合作用需要什么？", "黑暗", "寒冷", "阳光", "噪音", "C"),
]
SUBJECTS = {"ceval": ["accountant", "high_school_physics"], "cmmlu": ["agronomy", "world_history"]}


def write_subject(path: Path, rows, cmmlu: bool, dev: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if cmmlu:
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            w.writerows([k, *r] for k, r in enumerate(rows))
        else:
            w.writerow(["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if dev else []))
            w.writerows([k, *r] + (["因为如此"] if dev else []) for k, r in enumerate(rows))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each benchmark's directory and, per subject, its (scored file, dev file)."""
    out = {}
    for bench, subjects in SUBJECTS.items():
        root, files = tmp_path_factory.mktemp(bench), {}
        split, suffix = ("test", "") if bench == "cmmlu" else ("val", "_val")
        for k, subject in enumerate(subjects):
            rows = QUESTIONS[k:] + QUESTIONS[:k]  # a different order per subject
            scored = write_subject(root / split / f"{subject}{suffix}.csv", rows[:4 + k], bench == "cmmlu")
            dev = write_subject(root / "dev" / f"{subject}{'' if bench == 'cmmlu' else '_dev'}.csv", rows[2:],
                                bench == "cmmlu", dev=True)
            files[subject] = (scored, dev)
        out[bench] = (root, files)
    return out


def run_harness(hf_dir: Path, dirs, include: Path, shots: int) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    official = Path(lm_eval.__file__).parent / "tasks"
    names = []
    for bench, (_, files) in dirs.items():
        for subject, (scored, dev) in files.items():
            yaml = (official / "ceval" / f"ceval-valid_{subject}.yaml" if bench == "ceval"
                    else official / "cmmlu" / f"cmmlu_{subject}.yaml")
            split = "val" if bench == "ceval" else "test"
            name = f"{bench}_{subject}_local"
            if bench == "ceval":  # datasets wants one set of columns in all splits: dev without its explanation
                with open(dev, encoding="utf-8", newline="") as f:
                    rows = [r[:7] for r in csv.reader(f)][1:]
                dev = write_subject(include / f"{name}_dev.csv", [r[1:] for r in rows], cmmlu=False)
            (include / f"{name}.yaml").write_text(
                f"include: {yaml}\ntask: {name}\ntag: null\ndataset_path: csv\ndataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n    {split}: {scored}\n    dev: {dev}\n")
            names.append(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, log_samples=True,
                                      task_manager=TaskManager(include_path=str(include), include_defaults=False))
    samples = {n: sorted(out["samples"][n], key=lambda s: s["doc_id"]) for n in names}
    return {n: (out["results"][n], [[tuple(r[0]) for r in s["resps"]] for s in samples[n]],
                [s["arguments"] for s in samples[n]]) for n in names}


@pytest.fixture(scope="module", params=[0, 5], ids=["0-shot", "5-shot"])
def harness(request, long_hf, dirs, tmp_path_factory):  # noqa: F811
    pytest.importorskip("lm_eval")
    return request.param, run_harness(long_hf, dirs, tmp_path_factory.mktemp("harness-ceval"), request.param)


@pytest.mark.parametrize("bench", ["ceval", "cmmlu"])
def test_subjects_agree_with_the_harness(long_hf, dirs, harness, bench):  # noqa: F811
    shots, theirs = harness
    items = task_items(bench, dirs[bench][0], None, shots)
    model, tokenizer, _ = load_for_text(long_hf)
    metrics, results = score_task(model, PreparedTask.build(bench, items, tokenizer, LONG), 3, "cpu")
    total, n = 0.0, 0
    for subject in SUBJECTS[bench]:
        their_metrics, their_results, their_requests = theirs[f"{bench}_{subject}_local"]
        mine = [(it, r) for it, r in zip(items, results) if it.group == subject]
        assert [it.pairs() for it, _ in mine] == their_requests
        assert_same_lls([r for _, r in mine], their_results)
        assert metrics["subjects"][subject] == their_metrics["acc,none"]
        total, n = total + their_metrics["acc,none"] * len(mine), n + len(mine)
    assert metrics["acc"] == pytest.approx(total / n, abs=1e-12) and metrics["n"] == n


def test_bad_subject_directories(dirs, tmp_path):
    with pytest.raises(DataError, match="no such directory; task ceval expects C-Eval's directory"):
        read_task("ceval", tmp_path / "nope")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no test/SUBJECT.csv files; cmmlu expects"):
        read_task("cmmlu", tmp_path)
    write_subject(tmp_path / "test" / "cooking.csv", QUESTIONS[:2], cmmlu=True)
    with pytest.raises(DataError, match="unknown cmmlu subject 'cooking'"):
        read_task("cmmlu", tmp_path)
    (tmp_path / "test" / "cooking.csv").unlink()
    bad = tmp_path / "test" / "agronomy.csv"
    bad.write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError, match="agronomy.csv:2: answer must be one of A, B, C, D, got 'E'"):
        read_task("cmmlu", tmp_path)
    bad.write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(DataError, match="dev/agronomy.csv: no such file"):
        task_items("cmmlu", tmp_path, None, 2)


def test_eval_command_reports_subjects(long_hf, dirs, capsys):  # noqa: F811
    import json

    from clirun import run

    code, out, err = run(["eval", str(long_hf), "--task", "cmmlu", str(dirs["cmmlu"][0]), "--limit", "2",
                          "--num-fewshot", "1"], capsys)
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])["cmmlu"]
    assert last["n"] == 4 and set(last["subjects"]) == set(SUBJECTS["cmmlu"]) and "acc_norm" in last
    assert "cmmlu acc " in out and "subjects" not in out.splitlines()[-2]

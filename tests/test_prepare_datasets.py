"""gptforge prepare from Hugging Face datasets: saved to disk, from a hub cache offline, streamed, against JSON Lines.

The same records prepared from a JSON Lines file are the reference: the same tokens in the same shards, and the
same manifest but for where the input came from (the fingerprint's inputs, stats.files/bytes vs stats.source).
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from clirun import run

from gptforge.data import DataError, open_prepared
from gptforge.data.prepare import PrepareConfig, prepare

datasets = pytest.importorskip("datasets")

SHA = "0123456789abcdef0123456789abcdef01234567"  # the commit a hub cache was made from
REPO = "someorg/tiny-corpus"


@pytest.fixture(scope="module")
def texts():
    """40 English documents of varied length, an empty one and a missing one (None: an empty document too)."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:40]]
    return docs[:10] + [""] + docs[10:20] + [None] + docs[20:]


def cfg(**kw) -> PrepareConfig:
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("shard_tokens", 3000)
    return PrepareConfig(**kw)


def quiet(*_):
    pass


def records(texts):
    return {"id": list(range(len(texts))), "text": texts}


def saved_dataset(tmp_path, texts, as_dict=False):
    ds = datasets.Dataset.from_dict(records(texts))
    path = tmp_path / ("saved-dict" if as_dict else "saved")
    (datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}) if as_dict else ds).save_to_disk(str(path))
    return path


def hub_cache(cache, texts, tmp_path):
    """What `load_dataset(REPO)` leaves in HF_DATASETS_CACHE for a parquet-backed hub repository at commit SHA:
    namespace___name/config/version/commit/ with the Arrow files and dataset_info.json (the layout datasets reads
    offline, through its Cache builder)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    parquet = tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(records(texts)).to_parquet(str(parquet))
    owner, name = REPO.split("/")
    builder = Parquet(cache_dir=str(tmp_path / "scratch"), dataset_name=name,
                      data_files={"train": [str(parquet)]}, hash=SHA)
    builder.download_and_prepare(output_dir=str(cache / f"{owner}___{name}" / "default" / "0.0.0" / SHA))


@pytest.fixture
def offline_cache(tmp_path, texts, monkeypatch):
    """HF_DATASETS_CACHE with REPO in it, and the hub never asked (datasets reads its settings at import)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_home" / "datasets"
    hub_cache(cache, texts, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def jsonl(tmp_path, texts):
    path = tmp_path / "records.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return path


def shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def without_source(manifest):
    """The manifest less where the input came from."""
    m = json.loads(json.dumps(manifest))
    m["fingerprint"].pop("inputs")
    for key in ("files", "bytes", "source"):
        m["stats"].pop(key, None)
    return m


def test_saved_hub_cache_and_streamed_equal_jsonl(tmp_path, jsonl, texts, offline_cache):
    ref = prepare([jsonl], tmp_path / "ref", cfg(), log=quiet)
    assert len(ref["splits"]["train"]["shards"]) >= 5 and ref["splits"]["val"]["documents"] > 0
    saved, saved_dict = saved_dataset(tmp_path, texts), saved_dataset(tmp_path, texts, as_dict=True)
    runs = {
        "saved": ([str(saved)], {}),  # recognised without hf:
        "saved-streamed": ([f"hf:{saved}"], {"streaming": True}),
        "dict-split": ([str(saved_dict)], {"split": "train"}),
        "hub-cache": ([f"hf:{REPO}"], {}),
        "hub-cache-streamed": ([f"hf:{REPO}"], {"streaming": True, "config": "default"}),
    }
    for name, (inputs, flags) in runs.items():
        m = prepare(inputs, tmp_path / f"out-{name}", cfg(**flags), log=quiet)
        assert shards(tmp_path / f"out-{name}") == shards(tmp_path / "ref"), name
        assert without_source(m) == without_source(ref), name
        source = m["stats"]["source"]
        assert source["split"] == "train" and source["streaming"] == bool(flags.get("streaming")), name
        if name.startswith("hub"):
            assert source["dataset"] == REPO and source["config"] == "default" and source["revision"] == SHA
        else:
            assert source["revision"] is None and len(source["fingerprint"]) == 16
    assert ref["stats"]["empty_documents"] == m["stats"]["empty_documents"] == 2
    train, val = open_prepared(tmp_path / "out-hub-cache-streamed")  # trains like any prepared data
    assert len(train) == ref["splits"]["train"]["tokens"]


def test_rerun_is_a_no_op_and_another_revision_is_refused(tmp_path, texts, offline_cache, capsys):
    out = tmp_path / "out"
    prepare([f"hf:{REPO}"], out, cfg(), log=quiet)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logged = []
    prepare([f"hf:{REPO}"], out, cfg(streaming=True), log=logged.append)  # streamed or not: the same data
    assert "up to date" in logged[0] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    newer = offline_cache / "someorg___tiny-corpus" / "default" / "0.0.0" / ("f" * 40)
    newer.parent.joinpath(SHA).rename(newer)  # the cache now holds another commit of the dataset
    with pytest.raises(DataError, match="holds data prepared from other inputs or settings; pass --overwrite"):
        prepare([f"hf:{REPO}"], out, cfg(), log=quiet)
    m = prepare([f"hf:{REPO}"], out, cfg(overwrite=True), log=quiet)
    assert m["stats"]["source"]["revision"] == "f" * 40


def snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_interrupted_streaming_prepare_resumes_to_identical_shards(tmp_path, texts):
    saved = saved_dataset(tmp_path, texts)
    prepare([f"hf:{saved}"], tmp_path / "ref", cfg(streaming=True), log=quiet)
    ref = snapshot(tmp_path / "ref")
    for point, n in (("prepare-between-shards", 2), ("prepare-inside-shard", 20)):
        out = tmp_path / f"{point}-{n}"
        proc = subprocess.run([sys.executable, "-m", "gptforge", "prepare", f"hf:{saved}", "--streaming", "--out",
                               str(out), "--shard-tokens", "3000", "--val-fraction", "0.2", "--workers", "1",
                               "--no-progress"], env={**os.environ, "GPTFORGE_FAULT": f"{point}:{n}"},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"{point}:{n} did not kill prepare: {proc.stderr}"
        state = json.loads((out / "prepare-state.json").read_text())
        assert state["position"][0] == 0 and 0 < state["position"][1] < len(texts)  # stopped at a row
        finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
        prepare([f"hf:{saved}"], out, cfg(streaming=True), log=quiet)
        assert snapshot(out) == ref, f"{point}:{n}"
        assert {p: out.joinpath(p).stat().st_mtime_ns for p in finished} == finished  # resumed, not redone


def test_cli_offline_environment(tmp_path, texts, jsonl):
    """The real variables, through the CLI: HF_HOME's datasets cache, HF_HUB_OFFLINE=1."""
    home = tmp_path / "hf_home"
    hub_cache(home / "datasets", texts, tmp_path)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "gptforge", "prepare", f"hf:{REPO}", "--streaming", "--out",
                           str(tmp_path / "out"), "--shard-tokens", "3000", "--val-fraction", "0.2", "--workers", "2",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    prepare([jsonl], tmp_path / "ref", cfg(), log=quiet)
    assert shards(tmp_path / "out") == shards(tmp_path / "ref")
    proc = subprocess.run([sys.executable, "-m", "gptforge", "prepare", "hf:someorg/not-cached", "--out",
                           str(tmp_path / "none")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("gptforge: error: hf:someorg/not-cached: cannot load the "
                                                           "dataset (") and "Traceback" not in proc.stderr
    assert f"only a dataset loaded once before is read, from the cache {home / 'datasets'}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "none").exists()


def test_bad_rows_are_counted_or_named(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a b c", "d e f"], "n": [1, 2]}).save_to_disk(str(saved))
    with pytest.raises(DataError, match=rf"hf:{saved} split train: row 0: column 'n' holds int, not text; fix it, "
                                        "or pass --skip-bad-lines"):
        prepare([str(saved)], tmp_path / "o1", cfg(text_field="n"), log=quiet)
    with_text = tmp_path / "mixed"
    datasets.Dataset.from_list([{"text": "one two"}, {"text": None}, {"text": "three"}]).save_to_disk(str(with_text))
    m = prepare([str(with_text)], tmp_path / "o2", cfg(val_fraction=0.0), log=quiet)
    assert m["splits"]["train"]["documents"] == 2 and m["stats"]["empty_documents"] == 1


@pytest.mark.parametrize("args, says", [
    (["prepare", "{saved}", "--text-field", "body"], "{saved}: no column 'body' (columns: id, text); choose one "
                                                      "with --text-field"),
    (["prepare", "{dict}", "--split", "validation"], "{dict}: no split 'validation' (splits: train, test); choose "
                                                      "one with --split"),
    (["prepare", "{saved}", "--config", "sample"], "{saved}: a dataset saved with save_to_disk has no configs; drop "
                                                    "--config sample"),
    (["prepare", "{jsonl}", "--split", "train"], "--split is for a Hugging Face dataset (hf:NAME, or a directory "
                                                  "written by save_to_disk), and the inputs are files; drop it"),
    (["prepare", "{jsonl}", "--streaming"], "--streaming is for a Hugging Face dataset"),
    (["prepare", "{saved}", "{jsonl}"], "{saved}: a Hugging Face dataset is prepared on its own; give it as the only "
                                        "input"),
    (["prepare", "hf:"], "hf:: name a dataset after hf:"),
])
def test_mistakes_are_one_line(tmp_path, texts, jsonl, capsys, args, says):
    paths = {"saved": saved_dataset(tmp_path, texts[:5]), "dict": saved_dataset(tmp_path, texts[:5], as_dict=True),
             "jsonl": jsonl}
    args = [a.format(**paths) for a in args] + ["--out", str(tmp_path / "out")]
    code, out, err = run(args, capsys)
    assert code == 1 and err.startswith("gptforge: error: " + says.format(**paths)), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_without_datasets_installed_the_extra_is_named(tmp_path, monkeypatch, texts):
    saved = saved_dataset(tmp_path, texts[:3])
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    with pytest.raises(DataError, match=r"needs the datasets package: pip install 'gptforge\[datasets\]'"):
        prepare([str(saved)], tmp_path / "out", cfg(), log=quiet)


def test_dataset_order_is_kept(tmp_path, texts, jsonl):
    """Documents come out in the dataset's row order (a check on the stream, not only on equal bytes)."""
    from gptforge.tokenizer import get_tokenizer

    saved = saved_dataset(tmp_path, texts)
    prepare([str(saved)], tmp_path / "out", cfg(val_fraction=0.0, shard_tokens=10**9), log=quiet)
    tokens = np.fromfile(tmp_path / "out" / "train-000000.bin", dtype=np.uint16)
    tok = get_tokenizer("gpt2")
    expected = []
    for t in texts:
        if t:
            expected += [tok.eot_id, *tok.encode(t)]
    np.testing.assert_array_equal(tokens, np.array(expected, dtype=np.uint16))


def test_out_is_checked_before_the_dataset_is_opened(tmp_path, monkeypatch):
    from gptforge.data import prepare as prep

    monkeypatch.setattr(prep, "open_dataset", lambda *a: pytest.fail("the dataset was opened"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files gptforge prepare did not make"):
        prepare([f"hf:{REPO}"], tmp_path / "out", cfg(), log=quiet)

"""gptforge prepare: every input format against tiktoken's own encoding, splits, resume, bad input."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from clirun import run

from gptforge.data import DataError, ShardedTokens, open_prepared, shards, sources
from gptforge.data import prepare as prep
from gptforge.data.prepare import PrepareConfig, prepare

EOT = 50256


@pytest.fixture(scope="module")
def docs():
    """40 English documents of varied length (a few hundred to several thousand tokens)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


def cfg(**kw) -> PrepareConfig:
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    kw.setdefault("val_fraction", 0.0)
    return PrepareConfig(**kw)


def quiet(*_):
    pass


def stream(out, split="train") -> np.ndarray:
    """All tokens of a split, read straight from the shard files the manifest lists."""
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / sh["file"], dtype=m["dtype"]) for sh in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=m["dtype"])


def reference(texts, enc) -> np.ndarray:
    """<|endoftext|> before each document, then its tokens: tiktoken's gpt2 encoding of the whole text."""
    ids = []
    for t in texts:
        ids += [EOT] + enc.encode(t, allowed_special={"<|endoftext|>"})
    return np.array(ids, dtype=np.uint16)


def write_jsonl(path, texts, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"id": 1, field: t}) + "\n")


def documents_of(tokens: np.ndarray, enc) -> list[str]:
    """Decode a shard stream back into its documents (each starts with <|endoftext|>)."""
    assert len(tokens) == 0 or tokens[0] == EOT
    cuts = np.flatnonzero(tokens == EOT)
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


# ----------------------------------------------------------------------------- formats


def test_every_input_format_gives_tiktokens_ids(tmp_path, docs, tiktoken_gpt2):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(docs[0], encoding="utf-8")
    (src / "sub" / "b.md").write_text(docs[1], encoding="utf-8")
    write_jsonl(src / "c.jsonl", docs[2:10])
    write_jsonl(src / "d.jsonl.gz", docs[10:15], opener=gzip.open)
    (src / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[15].encode()))
    pq.write_table(pa.table({"text": docs[16:22], "n": list(range(6))}), src / "f.parquet")
    (src / "ignored.log").write_text("not included")
    out = tmp_path / "out"
    m = prepare([src], out, cfg(), log=quiet)
    order = [docs[0], *docs[2:10], *docs[10:15], docs[15], *docs[16:22], docs[1]]  # sorted paths: a c d e f sub/b
    np.testing.assert_array_equal(stream(out), reference(order, tiktoken_gpt2))
    assert m["splits"]["train"]["documents"] == len(order) and m["vocab_size"] == 50257 and m["dtype"] == "uint16"
    assert m["stats"]["files"] == 6  # ignored.log is not a default pattern


def test_include_patterns_and_text_field(tmp_path, docs, tiktoken_gpt2):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text(docs[0])
    (src / "b.log").write_text(docs[1])
    write_jsonl(src / "c.jsonl", docs[2:4], field="content")
    prepare([src], tmp_path / "out", cfg(include="*.log,*.jsonl", text_field="content"), log=quiet)
    np.testing.assert_array_equal(stream(tmp_path / "out"), reference([docs[1], docs[2], docs[3]], tiktoken_gpt2))


def test_large_text_file_in_pieces_equals_whole_file(tmp_path, docs, tiktoken_gpt2, monkeypatch):
    """A text file is read in pieces; the cuts fall between pre-tokens, so the ids are those of the whole."""
    monkeypatch.setattr(sources, "TEXT_CHUNK", 300)
    one_line = " ".join(d.replace("\n", " ") for d in docs[:3])  # no newline: the fallback cut before " word"
    text = "\n".join(docs[:6]) + "\n  indented\n\n\n" + one_line + " Ünïcode 東京 🤖 end\n"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    m = prepare([tmp_path / "big.txt"], tmp_path / "out", cfg(shard_tokens=500, workers=2), log=quiet)
    np.testing.assert_array_equal(stream(tmp_path / "out"), reference([text], tiktoken_gpt2))
    assert len(m["splits"]["train"]["shards"]) > 10  # shards cut inside the one document
    assert m["splits"]["train"]["documents"] == 1


def test_zstd_file_of_several_frames_is_read_whole(tmp_path, docs, tiktoken_gpt2, monkeypatch):
    """Frames one after another (as zstd -c a b > ab.zst or pzstd write them), read in small chunks."""
    import zstandard

    monkeypatch.setattr(sources, "TEXT_CHUNK", 500)
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.txt.zst").write_bytes(b"".join(c.compress(d.encode()) for d in docs[:3]) + c.compress(b""))
    prepare([tmp_path / "a.txt.zst"], tmp_path / "out", cfg(), log=quiet)
    np.testing.assert_array_equal(stream(tmp_path / "out"), reference(["".join(docs[:3])], tiktoken_gpt2))


# ----------------------------------------------------------------------------- splits


def test_split_by_whole_documents_is_deterministic(tmp_path, docs, tiktoken_gpt2):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    a = prepare([src], tmp_path / "a", cfg(val_fraction=0.25, seed=7, shard_tokens=3000), log=quiet)
    b = prepare([src], tmp_path / "b", cfg(val_fraction=0.25, seed=7, shard_tokens=3000, workers=2), log=quiet)
    prepare([src], tmp_path / "c", cfg(val_fraction=0.25, seed=8, shard_tokens=3000), log=quiet)
    assert a["splits"] == b["splits"]  # same seed: same shards, byte for byte (sha256), any number of workers
    train, val = documents_of(stream(tmp_path / "a"), tiktoken_gpt2), documents_of(stream(tmp_path / "a", "val"),
                                                                                   tiktoken_gpt2)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)  # whole documents, each once
    assert 3 <= len(val) <= 18 and a["splits"]["val"]["documents"] == len(val)
    assert [d for d in docs if d in val] == val  # input order is kept within a split
    other_val = documents_of(stream(tmp_path / "c", "val"), tiktoken_gpt2)
    assert set(other_val) != set(val)  # another seed, another split


def test_val_docs_exact_count(tmp_path, docs, tiktoken_gpt2):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    m = prepare([src], tmp_path / "a", cfg(val_docs=5), log=quiet)
    val = documents_of(stream(tmp_path / "a", "val"), tiktoken_gpt2)
    assert len(val) == 5 == m["splits"]["val"]["documents"] and m["splits"]["train"]["documents"] == 35
    assert prepare([src], tmp_path / "b", cfg(val_docs=5, workers=2), log=quiet)["splits"] == m["splits"]
    with pytest.raises(DataError, match="--val-docs 40"):
        prepare([src], tmp_path / "c", cfg(val_docs=40), log=quiet)


def test_documents_are_separated_by_end_of_text(tmp_path, docs):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs[:10] + ["", "   "])  # empty documents are skipped, not written as a bare separator
    m = prepare([src], tmp_path / "out", cfg(), log=quiet)
    tokens = stream(tmp_path / "out")
    assert tokens[0] == EOT and (tokens == EOT).sum() == 10 == m["splits"]["train"]["documents"]
    assert m["stats"]["empty_documents"] == 2
    (tmp_path / "empty.txt").write_text("")
    m = prepare([src, tmp_path / "empty.txt"], tmp_path / "out2", cfg(), log=quiet)
    assert m["stats"]["empty_documents"] == 3 and m["splits"]["train"]["documents"] == 10
    assert not (np.diff(np.flatnonzero(tokens == EOT)) == 1).any()


# ----------------------------------------------------------------------------- resume and re-run


def test_interrupted_prepare_resumes_without_redoing_shards(tmp_path, docs, monkeypatch):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    settings = dict(val_fraction=0.2, shard_tokens=4000)
    full = prepare([src], tmp_path / "full", cfg(**settings), log=quiet)

    out = tmp_path / "out"
    real_atomic = shards._atomic_write
    commits = []

    def crash_after_three(path, obj):
        real_atomic(path, obj)
        commits.append(obj["position"])
        if len(commits) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C right after the third shard group is finished

    monkeypatch.setattr(shards, "_atomic_write", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, cfg(**settings), log=quiet)
    monkeypatch.setattr(shards, "_atomic_write", real_atomic)
    assert not (out / "manifest.json").exists() and (out / "prepare-state.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert finished and not list(out.glob(".*.tmp"))
    (out / ".train-000099.bin.tmp").write_bytes(b"\0" * 10)  # a half-written shard is never taken for one

    encoded = []
    real_encode = prep.encode_task
    monkeypatch.setattr(prep, "encode_task", lambda job, kind, payloads: encoded.append(len(payloads))
                        or real_encode(job, kind, payloads))
    m = prepare([src], out, cfg(**settings), log=quiet)
    assert m["splits"] == full["splits"]  # same shards, same sha256, as a run never stopped
    assert sum(encoded) == len(docs) - commits[-1][1]  # only the records after the last finished shard
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin") if p.name in finished} == finished
    assert not list(out.glob(".*.tmp")) and not (out / "prepare-state.json").exists()


def test_resume_inside_a_document(tmp_path, docs, tiktoken_gpt2, monkeypatch):
    monkeypatch.setattr(sources, "TEXT_CHUNK", 400)
    (tmp_path / "a.txt").write_text("\n".join(docs[:4]))
    (tmp_path / "b.txt").write_text("\n".join(docs[4:8]))
    real_atomic, n = shards._atomic_write, []

    def crash(path, obj):
        real_atomic(path, obj)
        n.append(1)
        if len(n) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", cfg(shard_tokens=700), log=quiet)
    state = json.loads((tmp_path / "out" / "prepare-state.json").read_text())
    assert state["open_doc"] == "train" and state["position"][1] > 0  # stopped in the middle of a.txt
    monkeypatch.setattr(shards, "_atomic_write", real_atomic)
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", cfg(shard_tokens=700), log=quiet)
    expected = reference(["\n".join(docs[:4]), "\n".join(docs[4:8])], tiktoken_gpt2)
    np.testing.assert_array_equal(stream(tmp_path / "out"), expected)


def test_rerun_on_unchanged_input_does_nothing(tmp_path, docs):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs[:5])
    prepare([src], tmp_path / "out", cfg(), log=quiet)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    logged = []
    prepare([src], tmp_path / "out", cfg(), log=logged.append)
    assert "nothing to do" in logged[0]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    write_jsonl(src, docs[:6])  # the input changed
    with pytest.raises(DataError, match="other inputs or settings.*--overwrite"):
        prepare([src], tmp_path / "out", cfg(), log=quiet)
    m = prepare([src], tmp_path / "out", cfg(overwrite=True), log=quiet)
    assert m["splits"]["train"]["documents"] == 6


# ----------------------------------------------------------------------------- reading shards


def test_sharded_tokens_read_by_memory_map(tmp_path, docs, monkeypatch):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    prepare([src], tmp_path / "out", cfg(shard_tokens=2000, val_fraction=0.1), log=quiet)
    train, val = open_prepared(tmp_path / "out")
    flat = stream(tmp_path / "out")
    assert isinstance(train, ShardedTokens) and len(train) == len(flat) and len(val) > 0
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(flat), (7, 33))
    np.testing.assert_array_equal(train[idx], flat[idx])
    opened = []
    real_memmap = np.memmap
    monkeypatch.setattr(np, "memmap", lambda path, **kw: opened.append(path.name) or real_memmap(path, **kw))
    out = train[np.arange(10)]
    assert opened == ["train-000000.bin"] and type(out) is np.ndarray  # only the shards a batch touches are mapped
    b = int(train.offsets[1])  # a window across the first shard boundary
    np.testing.assert_array_equal(train[np.arange(b - 5, b + 5)], flat[b - 5 : b + 5])
    view = train[100:5000]
    np.testing.assert_array_equal(view.to_numpy(), flat[100:5000])
    with pytest.raises(IndexError):
        view[np.array([4900])]


def write_positional_shards(out, lengths):
    """Shards whose token at position p is p % 60000, with a manifest: values tell where a window came from."""
    out.mkdir()
    shards, pos = [], 0
    for i, n in enumerate(lengths):
        data = (np.arange(pos, pos + n) % 60000).astype(np.uint16).tobytes()
        (out / f"train-{i:06d}.bin").write_bytes(data)
        shards.append({"file": f"train-{i:06d}.bin", "tokens": n, "documents": 1,
                       "sha256": hashlib.sha256(data).hexdigest()})
        pos += n
    manifest = {"format": "gptforge-shards", "version": 1, "tokenizer": {"name": "gpt2"}, "vocab_size": 50257,
                "eot_id": EOT, "dtype": "uint16", "splits": {"train": {"tokens": pos, "documents": 3,
                                                                       "shards": shards},
                                                             "val": {"tokens": 0, "documents": 0, "shards": []}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return pos


def test_each_rank_reads_a_disjoint_share(tmp_path):
    from gptforge.data import RandomBatches

    total = write_positional_shards(tmp_path / "d", [7000, 5000, 9001])
    world = 3
    seen = []
    for r in range(world):
        share, _ = open_prepared(tmp_path / "d", rank=r, world_size=world)
        lo = share.start
        assert lo == r * total // world and len(share) == (r + 1) * total // world - lo
        batches = RandomBatches(share, context_length=64, batch_size=16, seed=1)
        positions = set()
        for b in range(50):
            x, y = batches.batch(0, b)
            first = x[:, 0].numpy().astype(np.int64)
            starts = lo + ((first - lo) % 60000)  # undo the % 60000 (shares are shorter than 60000)
            assert ((starts >= lo) & (starts + 65 <= lo + len(share))).all()
            positions |= set(starts.tolist())
        seen.append(positions)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
    with pytest.raises(DataError, match="100 bytes, manifest.json says 10000"):
        with open(tmp_path / "d" / "train-000001.bin", "r+b") as f:
            f.truncate(100)
        open_prepared(tmp_path / "d")


def test_train_on_prepared_dir_resumes_exactly(tmp_path, docs):
    import shutil

    import torch

    from gptforge import checkpoint as ckpt
    from gptforge.data import DataConfig
    from gptforge.models.gpt2 import GPTConfig
    from gptforge.training import train
    from gptforge.training.config import RunConfig, TrainConfig

    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs[:12])
    prepare([src], tmp_path / "data", cfg(shard_tokens=3000, val_docs=2), log=quiet)
    for sampling in ("random", "sequential"):
        run_cfg = RunConfig(
            model=GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1),
            data=DataConfig(sampling=sampling),
            train=TrainConfig(batch_size=4, max_steps=6, eval_every=3, eval_batches=2, log_every=1, sample_tokens=0,
                              save_every=2, keep_last=0, seed=3, device="cpu", progress=False),
            inputs=[str(tmp_path / "data")],
        )
        full, cut = tmp_path / f"full-{sampling}", tmp_path / f"cut-{sampling}"
        train(run_cfg, full, log=quiet)
        shutil.copytree(full, cut)
        for d in ckpt.checkpoint_dirs(cut)[2:]:
            shutil.rmtree(d)
        train(run_cfg, cut, resume=True, log=quiet)

        def losses(run):
            records = map(json.loads, open(run / "metrics.jsonl"))
            return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in records]

        lines = losses(full)
        assert lines == losses(cut) and len(lines) == 9
        assert any(r.get("val_loss") for r in lines)  # val comes from the prepared val split
        a = ckpt.load_state(ckpt.latest_checkpoint(full))
        b = ckpt.load_state(ckpt.latest_checkpoint(cut))
        assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
        wa = ckpt.read_weights_meta(ckpt.latest_checkpoint(full) / ckpt.WEIGHTS)
        assert wa["tokenizer"] == "gpt2"
        from safetensors.torch import load_file

        sa, sb = (load_file(str(ckpt.latest_checkpoint(r) / ckpt.WEIGHTS)) for r in (full, cut))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- bad input


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path, tiktoken_gpt2):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok\n\xff\xfe end")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x\xc3 y"}\n{"text": "lone \\ud800 surrogate"}\n')
    logged = []
    m = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", cfg(), log=logged.append)
    assert m["stats"]["invalid_utf8_replaced"] == 5  # \xe9, \xff, \xfe, \xc3 and the lone surrogate
    warning = next(line for line in logged if "invalid UTF-8" in line)
    assert "5 invalid UTF-8" in warning and "a.txt: byte 3" in warning and "b.jsonl:1" in warning
    docs = documents_of(stream(tmp_path / "out"), tiktoken_gpt2)
    assert docs == ["caf\ufffd ok\n\ufffd\ufffd end", "x\ufffd y", "lone ? surrogate"]


def test_bad_json_line_names_file_and_line(tmp_path, docs):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"text": docs[0]}) + "\n\n" + '{"text": "unterminated\n' + json.dumps({"text": "b"}))
    with pytest.raises(DataError, match=r"c.jsonl:3: not valid JSON .*--skip-bad-lines"):
        prepare([src], tmp_path / "out", cfg(), log=quiet)
    logged = []
    m = prepare([src], tmp_path / "out", cfg(skip_bad_lines=True), log=logged.append)
    assert m["splits"]["train"]["documents"] == 2 and m["stats"]["bad_lines_skipped"] == 1
    assert any("1 bad records skipped" in line and "c.jsonl:3" in line for line in logged)


def test_missing_text_field(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"content": "hello"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: no field 'text' \(the record has: content\).*--text-field"):
        prepare([src], tmp_path / "out", cfg(), log=quiet)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: body\)"):
        prepare([tmp_path / "p.parquet"], tmp_path / "out2", cfg(), log=quiet)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    import sys

    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"p.parquet: reading Parquet needs pyarrow: pip install 'gptforge\[parquet\]'"):
        prepare([tmp_path / "p.parquet"], tmp_path / "out", cfg(), log=quiet)


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no file matching"):
        prepare([tmp_path / "empty"], tmp_path / "out", cfg(), log=quiet)
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\n ")
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no text found .* all 3 input file"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"], tmp_path / "out", cfg(), log=quiet)
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "nope.txt"], tmp_path / "out", cfg(), log=quiet)


def test_output_inside_an_input_directory_is_not_read_back(tmp_path, docs):
    write_jsonl(tmp_path / "c.jsonl", docs[:3])
    first = prepare([tmp_path], tmp_path / "data", cfg(), log=quiet)
    again = prepare([tmp_path], tmp_path / "data", cfg(), log=quiet)  # manifest.json is not an input
    assert again == first and first["stats"]["files"] == 1


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory):
    """A word-level tokenizer.json with 70,001 ids: more than uint16 holds."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(69_999)}, "<|endoftext|>": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_vocabulary_too_large_for_dtype(tmp_path, big_vocab_tokenizer):
    (tmp_path / "a.txt").write_text("w1 w69998 w65536 nope")
    with pytest.raises(DataError, match="70,001 ids, too many for uint16"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", cfg(tokenizer=str(big_vocab_tokenizer), dtype="uint16"),
                log=quiet)
    m = prepare([tmp_path / "a.txt"], tmp_path / "out", cfg(tokenizer=str(big_vocab_tokenizer)), log=quiet)
    assert m["dtype"] == "uint32" and m["tokenizer"]["file"] == "tokenizer.json"
    assert stream(tmp_path / "out").tolist() == [70_000, 2, 69_999, 65_537, 0]


def test_cli_prepare_errors_are_one_line(tmp_path, capsys):
    from gptforge.cli import main

    src = tmp_path / "c.jsonl"
    src.write_text("not json\n")
    with pytest.raises(SystemExit) as e:
        main(["prepare", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "c.jsonl:1: not valid JSON" in err


# ----------------------------------------------------------------------------- killed, resumed: the same bytes


def snapshot(root) -> dict[str, bytes]:
    """Every file under root (relative name) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.multiprocess
def test_prepare_killed_at_each_fault_point_resumes_to_the_same_bytes(tmp_path, docs):
    """SIGKILL inside a shard and between shards (two counts each), resume: shards and manifest byte for byte.

    The manifest holds nothing that depends on the time of the run (the fingerprint has the inputs' own
    sizes and mtimes, the same for both runs), so the whole directory is compared.
    """
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs)
    settings = dict(val_fraction=0.2, shard_tokens=3000)
    prepare([src], tmp_path / "ref", cfg(**settings), log=quiet)
    ref = snapshot(tmp_path / "ref")
    assert len([n for n in ref if n.endswith(".bin")]) >= 8
    for point, n, workers in (("prepare-between-shards", 1, 1), ("prepare-between-shards", 5, 2),
                              ("prepare-inside-shard", 3, 1), ("prepare-inside-shard", 45, 2)):  # 40 documents,
        out = tmp_path / f"{point}-{n}"  # 2 writes each (<|endoftext|>, its tokens)
        proc = subprocess.run([sys.executable, "-m", "gptforge", "prepare", str(src), "--out", str(out),
                               "--shard-tokens", "3000", "--val-fraction", "0.2", "--workers", str(workers),
                               "--no-progress"],
                              env={**os.environ, "GPTFORGE_FAULT": f"{point}:{n}"}, capture_output=True, text=True,
                              timeout=120)  # returns once the workers are gone too: they die with prepare
        assert proc.returncode == -signal.SIGKILL, f"{point}:{n} did not kill prepare: {proc.stderr}"
        assert not (out / "manifest.json").exists()
        if point == "prepare-inside-shard":
            assert [p.stat().st_size > 0 for p in out.glob(".*.bin.tmp")] == [True]  # a shard half written
        finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
        assert bool(finished) == (out / "prepare-state.json").exists() == (point.endswith("between-shards") or n > 3)
        prepare([src], out, cfg(**settings), log=quiet)
        assert snapshot(out) == ref, f"{point}:{n}"
        assert {p: out.joinpath(p).stat().st_mtime_ns for p in finished} == finished  # resumed, not redone


# ----------------------------------------------------------------------------- damaged shards and manifest


def test_damaged_shard_is_named_when_training_opens_it_and_prepared_again(tmp_path, docs):
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs[:10])
    settings = dict(val_fraction=0.3, shard_tokens=1500)
    out = tmp_path / "out"
    prepare([src], out, cfg(**settings), log=quiet)
    ref = snapshot(out)
    open_prepared(out)  # verified: the check is cheap from now on (a stat per shard)
    shard = out / "train-000002.bin"
    size = shard.stat().st_size

    def flip(at):
        with open(shard, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x01]))

    def ids_beyond_vocab():
        with open(shard, "r+b") as f:
            f.seek(10)
            f.write(np.array([65535], dtype="<u2").tobytes())

    damages = [("flip first byte", lambda: flip(0)), ("flip middle byte", lambda: flip(size // 2 + 1)),
               ("flip last byte", lambda: flip(size - 1)), ("id 65535 > vocab", ids_beyond_vocab),
               ("truncate", lambda: os.truncate(shard, size - 2)), ("delete", shard.unlink)]
    for what, damage in damages:
        damage()
        with pytest.raises(DataError) as e:
            open_prepared(out)
        message = str(e.value)
        assert message.startswith(str(shard)) and "\n" not in message, what
        assert ("sha256" in message) if what.startswith(("flip", "id")) else ("missing" in message
                                                                              or "bytes" in message)
        logged = []
        prepare([src], out, cfg(**settings), log=logged.append)
        assert [line for line in logged if line.startswith("warning: ")] == [
            f"warning: {message.split('; run the same')[0]}; preparing {out} again from the start"], what
        assert snapshot(out) == ref, what


def test_ids_beyond_the_vocabulary_stop_the_batch_that_reads_them(tmp_path, docs):
    """A shard edited with its modification time put back (open_prepared sees nothing): the read names it."""
    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs[:10])
    prepare([src], tmp_path / "out", cfg(shard_tokens=1500), log=quiet)
    shard = tmp_path / "out" / "train-000001.bin"
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(np.array([50257], dtype="<u2").tobytes())  # the first id past GPT-2's 50,257
    before = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns - 10**9
    os.utime(shard, ns=(before, before))
    train, _ = open_prepared(tmp_path / "out")
    with pytest.raises(DataError, match=rf"{shard}: holds id 50257, not below the vocabulary size 50257"):
        train[np.arange(train.offsets[1], train.offsets[2])]
    np.testing.assert_array_equal(train[np.arange(10)], stream(tmp_path / "out")[:10])  # other shards read on


def test_every_flipped_byte_of_the_manifest_is_caught_or_harmless(tmp_path, docs):
    """A bit or a whole byte flipped anywhere in manifest.json: one line naming the file, or the very same tokens."""
    from gptforge.tokenizer import GPT2Tokenizer

    src = tmp_path / "c.jsonl"
    write_jsonl(src, docs[:6])
    out = tmp_path / "out"
    prepare([src], out, cfg(val_fraction=0.3, shard_tokens=2000), log=quiet)
    path = out / "manifest.json"
    good = path.read_bytes()
    tok = GPT2Tokenizer()

    def what_is_read(tokens):  # with the shard files unchanged, these fix every token a split yields
        return [p.name for p in tokens.paths], tokens.lengths.tolist(), tokens.dtype, tokens.start, tokens.stop

    train, val = (what_is_read(t) for t in open_prepared(out, tok))
    assert train[1] and val[1]
    caught = harmless = 0
    with open(path, "r+b", buffering=0) as f:  # one byte rewritten in place, then put back
        for at in range(len(good)):
            for mask in (0x01, 0xFF):
                f.seek(at)
                f.write(bytes([good[at] ^ mask]))
                try:
                    t, v = open_prepared(out, tok)
                except DataError as e:
                    assert str(out) in str(e) and "\n" not in str(e), (at, mask, str(e))
                    caught += 1
                else:
                    assert (what_is_read(t), what_is_read(v)) == (train, val), (at, mask)
                    harmless += 1  # e.g. in the fingerprint or stats, which training does not read
                f.seek(at)
                f.write(good[at : at + 1])
    assert path.read_bytes() == good
    print(f"manifest flips: {caught} caught, {harmless} harmless, of {2 * len(good)}")
    assert caught > len(good)  # every 0xFF flip is invalid UTF-8, most others break the JSON or a checked key


# ----------------------------------------------------------------------------- bad input: one line, nothing lost


def prep_cmd(src, out):
    return ["prepare", str(src), "--out", str(out), "--no-progress", "--workers", "1"]


def tok_cmd(src, out):
    return ["tokenizer", "train", str(src), "--vocab-size", "300", "--out", str(out)]


def train_cmd(data, tmp):
    return ["train", str(data), "--out", str(tmp / "run"), "--preset", "tiny", "--context-length", "16",
            "--batch-size", "2", "--max-steps", "1", "--device", "cpu", "--no-progress"]


def good_input(tmp):
    write_jsonl(tmp / "c.jsonl", [f"document {i}: some text to learn from, and then some more. " * 10
                                  for i in range(6)])
    return tmp / "c.jsonl"


def prepared(tmp, edit=None):
    """A finished prepare in tmp/data (several shards), its manifest changed by `edit` when given."""
    prepare([good_input(tmp)], tmp / "data", cfg(shard_tokens=150), log=quiet)
    if edit:
        m = json.loads((tmp / "data" / "manifest.json").read_text())
        edit(m)
        (tmp / "data" / "manifest.json").write_text(json.dumps(m))
    return tmp / "data"


def out_file(tmp):
    (tmp / "out").write_text("the user's notes")
    return tmp / "out"


def out_below_file(tmp):
    (tmp / "notes").write_text("the user's notes")
    return tmp / "notes" / "sub"


def out_with_files(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("the user's notes")
    return tmp / "out"


def out_with_tokenizer(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "tokenizer.json").write_text("{}")
    return tmp / "out"


def named(name, data):
    def make(tmp):
        (tmp / name).write_bytes(data() if callable(data) else data)
        return tmp / name
    return make


def zstd_half():
    import zstandard

    data = zstandard.ZstdCompressor().compress(b"some text " * 5000)
    return data[: len(data) // 2]


def gzip_half():
    data = gzip.compress(b"some text " * 5000)
    return data[: len(data) // 2]


def damaged_manifest(tmp):
    data = prepared(tmp)
    (data / "manifest.json").write_bytes((data / "manifest.json").read_bytes()[:100])
    return data


def shard_beyond_vocab(tmp):
    data = prepared(tmp)
    with open(data / "train-000001.bin", "r+b") as f:
        f.write(np.array([65535], dtype="<u2").tobytes())
    return data


def unfinished(tmp):
    (tmp / "data").mkdir()
    (tmp / "data" / "prepare-state.json").write_text("{}")
    return tmp / "data"


def del_key(m):
    del m["splits"]["train"]["shards"][1]["sha256"]


def str_count(m):
    m["splits"]["train"]["shards"][0]["tokens"] = str(m["splits"]["train"]["shards"][0]["tokens"])


def eval_cmd(data, tmp):
    """eval of a tiny GPT-2-vocabulary model on DATA."""
    import torch

    from gptforge import weights
    from gptforge.models.gpt2 import GPT, GPTConfig

    torch.manual_seed(0)
    path = weights.to_gptforge(GPT(GPTConfig(context_length=16, emb_dim=16, n_heads=2, n_layers=1)),
                               tmp / "m.safetensors")
    return ["eval", str(path), str(data), "--context-length", "16"]


# (command, what the mistake is, how to make it: () -> argv, what stderr says, checked before any costly work)
BAD_INPUT = [
    ("prepare", "--out is a file", lambda t: prep_cmd(good_input(t), out_file(t)), "out: is a file, not a directory",
     True),
    ("prepare", "--out below a file", lambda t: prep_cmd(good_input(t), out_below_file(t)),
     "notes is a file, not a directory", True),
    ("prepare", "--out holds other files", lambda t: prep_cmd(good_input(t), out_with_files(t)),
     "holds files gptforge prepare did not make (notes.txt)", True),
    ("prepare", "--out holds the inputs", lambda t: prep_cmd(out_with_files(t), t / "out"), "every input is inside it",
     True),
    ("prepare", ".zst not zstd", lambda t: prep_cmd(named("a.txt.zst", b"plain text")(t), t / "out"),
     "a.txt.zst: named .zst but not zstd data", True),
    ("prepare", ".gz not gzip", lambda t: prep_cmd(named("a.jsonl.gz", b"{}")(t), t / "out"),
     "a.jsonl.gz: named .gz but not gzip data", True),
    ("prepare", ".zst truncated", lambda t: prep_cmd(named("a.txt.zst", zstd_half)(t), t / "out"),
     "a.txt.zst: ends inside a zstd frame: the file is truncated", False),
    ("prepare", ".gz truncated", lambda t: prep_cmd(named("a.txt.gz", gzip_half)(t), t / "out"),
     "a.txt.gz: cannot decompress or read (Compressed file ended", False),
    ("prepare", "text of NUL bytes", lambda t: prep_cmd(named("a.txt", b"\0" * 1000)(t), t / "out"),
     "a.txt: a binary file, not text (a NUL byte at byte 0)", False),
    ("prepare", "manifest truncated (re-run)", lambda t: prep_cmd(t / "c.jsonl", damaged_manifest(t)),
     "manifest.json: not valid JSON", False),
    ("prepare", "resume state damaged", lambda t: prep_cmd(good_input(t), unfinished(t)),
     "prepare-state.json: fingerprint is missing or damaged; pass --overwrite", False),
    ("tokenizer train", "--out is a file", lambda t: tok_cmd(good_input(t), out_file(t)),
     "out: is a file, not a directory", True),
    ("tokenizer train", "--out holds other files", lambda t: tok_cmd(good_input(t), out_with_files(t)),
     "holds files gptforge tokenizer train did not make (notes.txt)", True),
    ("tokenizer train", "--out holds a tokenizer.json", lambda t: tok_cmd(good_input(t), out_with_tokenizer(t)),
     "already holds tokenizer.json; pass --overwrite", True),
    ("tokenizer train", ".zst not zstd", lambda t: tok_cmd(named("a.txt.zst", b"plain text")(t), t / "out"),
     "a.txt.zst: named .zst but not zstd data", True),
    ("tokenizer train", ".gz not gzip", lambda t: tok_cmd(named("a.txt.gz", b"plain text")(t), t / "out"),
     "a.txt.gz: named .gz but not gzip data", True),
    ("tokenizer train", ".zst truncated", lambda t: tok_cmd(named("a.txt.zst", zstd_half)(t), t / "out"),
     "a.txt.zst: ends inside a zstd frame", False),
    ("tokenizer train", "text of NUL bytes", lambda t: tok_cmd(named("a.txt", b"\0" * 1000)(t), t / "out"),
     "a.txt: a binary file, not text", False),
    ("train", "shard ids beyond the vocabulary", lambda t: train_cmd(shard_beyond_vocab(t), t),
     "train-000001.bin: changed after manifest.json was written (its sha256", False),
    ("train", "manifest missing a key", lambda t: train_cmd(prepared(t, del_key), t),
     "manifest.json: splits.train.shards[1].sha256 is missing", False),
    ("train", "manifest value of the wrong type", lambda t: train_cmd(prepared(t, str_count), t),
     'manifest.json: splits.train.shards[0].tokens must be a count, got "', False),
    ("train", "manifest truncated", lambda t: train_cmd(damaged_manifest(t), t), "manifest.json: not valid JSON",
     False),
    ("train", "an unfinished prepare", lambda t: train_cmd(unfinished(t), t),
     "data: gptforge prepare did not finish there", False),
    ("train", "a .jsonl file", lambda t: train_cmd(good_input(t), t),
     "c.jsonl: a JSON Lines file; only gptforge prepare reads those: gptforge prepare", False),
    ("train", "a .txt.zst file", lambda t: train_cmd(named("a.txt.zst", zstd_half)(t), t),
     "a.txt.zst: a zstd-compressed file; only gptforge prepare", False),
    ("train", "text of NUL bytes", lambda t: train_cmd(named("a.txt", b"\0" * 1000)(t), t),
     "a.txt: a binary file, not text (a NUL byte at byte 0)", False),
    ("train", "--val-fraction on prepared data", lambda t: train_cmd(prepared(t), t) + ["--val-fraction", "0.2"],
     "/data is prepared data, whose split its manifest fixes; leave --val-fraction out", False),
    ("eval", "prepared data without a val split", lambda t: eval_cmd(prepared(t), t),
     "data: has no val split (prepared with --val-fraction 0), so there is no held-out text to score; score the "
     "train split with --split train", False),
]


@pytest.mark.parametrize("command, mistake, make, says, early", BAD_INPUT,
                         ids=[f"{c}: {m}" for c, m, *_ in BAD_INPUT])
def test_bad_input_is_one_line_and_nothing_is_lost(tmp_path, capsys, monkeypatch, command, mistake, make, says,
                                                   early):
    from gptforge import tokenizer

    argv = make(tmp_path)
    capsys.readouterr()
    if early:  # the mistake must be found before the tokenizer loads (prepare) or training starts (tokenizer train)
        def too_late(*_a, **_k):
            raise AssertionError(f"{mistake}: costly work started before the check")

        monkeypatch.setattr(prep, "get_tokenizer", too_late)
        monkeypatch.setattr(tokenizer, "train_bpe", too_late)
    before = snapshot(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 1 and err.startswith("gptforge: error: ") and err.count("\n") == 1, err
    assert says in err
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed or lost
    assert sorted(set(after) - set(before)) == []  # and nothing written


def test_read_only_out_is_refused_before_any_work(tmp_path, read_only_dir, capsys, monkeypatch):
    from gptforge import tokenizer

    src = good_input(tmp_path)
    kept = snapshot(read_only_dir)

    def too_late(*_a, **_k):
        raise AssertionError("costly work started before the check")

    monkeypatch.setattr(prep, "get_tokenizer", too_late)
    monkeypatch.setattr(tokenizer, "train_bpe", too_late)
    for argv, says in ((prep_cmd(src, read_only_dir / "data"), f"cannot write in {read_only_dir} ("),
                       (tok_cmd(src, read_only_dir / "tok"), f"cannot write in {read_only_dir} ("),
                       (prep_cmd(src, read_only_dir), "did not make (kept.txt)")):
        code, out, err = run(argv, capsys)
        assert code == 1 and err.count("\n") == 1 and says in err, err
    assert snapshot(read_only_dir) == kept


def test_damaged_manifest_is_prepared_anew_with_overwrite(tmp_path, capsys):
    data = damaged_manifest(tmp_path)
    code, out, err = run(prep_cmd(tmp_path / "c.jsonl", data) + ["--overwrite"], capsys)
    assert code == 0, err
    assert open_prepared(data)[0].to_numpy().size > 0

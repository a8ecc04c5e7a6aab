"""gptforge prepare: every input format against tiktoken's own encoding, splits, resume, bad input."""

import gzip
import json

import numpy as np
import pytest

from gptforge import prepare as prep
from gptforge.data import DataError, ShardedTokens, open_prepared
from gptforge.prepare import PrepareConfig, prepare

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
    monkeypatch.setattr(prep, "TEXT_CHUNK", 300)
    one_line = " ".join(d.replace("\n", " ") for d in docs[:3])  # no newline: the fallback cut before " word"
    text = "\n".join(docs[:6]) + "\n  indented\n\n\n" + one_line + " Ünïcode 東京 🤖 end\n"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    m = prepare([tmp_path / "big.txt"], tmp_path / "out", cfg(shard_tokens=500, workers=2), log=quiet)
    np.testing.assert_array_equal(stream(tmp_path / "out"), reference([text], tiktoken_gpt2))
    assert len(m["splits"]["train"]["shards"]) > 10  # shards cut inside the one document
    assert m["splits"]["train"]["documents"] == 1


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
    real_atomic = prep._atomic_json
    commits = []

    def crash_after_three(path, obj):
        real_atomic(path, obj)
        commits.append(obj["position"])
        if len(commits) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C right after the third shard group is finished

    monkeypatch.setattr(prep, "_atomic_json", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, cfg(**settings), log=quiet)
    monkeypatch.setattr(prep, "_atomic_json", real_atomic)
    assert not (out / "manifest.json").exists() and (out / "prepare-state.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert finished and not list(out.glob(".*.tmp"))
    (out / ".train-000099.bin.tmp").write_bytes(b"\0" * 10)  # a half-written shard is never taken for one

    encoded = []
    real_encode = prep._encode_task
    monkeypatch.setattr(prep, "_encode_task", lambda kind, payloads: encoded.append(len(payloads))
                        or real_encode(kind, payloads))
    m = prepare([src], out, cfg(**settings), log=quiet)
    assert m["splits"] == full["splits"]  # same shards, same sha256, as a run never stopped
    assert sum(encoded) == len(docs) - commits[-1][1]  # only the records after the last finished shard
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin") if p.name in finished} == finished
    assert not list(out.glob(".*.tmp")) and not (out / "prepare-state.json").exists()


def test_resume_inside_a_document(tmp_path, docs, tiktoken_gpt2, monkeypatch):
    monkeypatch.setattr(prep, "TEXT_CHUNK", 400)
    (tmp_path / "a.txt").write_text("\n".join(docs[:4]))
    (tmp_path / "b.txt").write_text("\n".join(docs[4:8]))
    real_atomic, n = prep._atomic_json, []

    def crash(path, obj):
        real_atomic(path, obj)
        n.append(1)
        if len(n) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_atomic_json", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", cfg(shard_tokens=700), log=quiet)
    state = json.loads((tmp_path / "out" / "prepare-state.json").read_text())
    assert state["open_doc"] == "train" and state["position"][1] > 0  # stopped in the middle of a.txt
    monkeypatch.setattr(prep, "_atomic_json", real_atomic)
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
        (np.arange(pos, pos + n) % 60000).astype(np.uint16).tofile(out / f"train-{i:06d}.bin")
        shards.append({"file": f"train-{i:06d}.bin", "tokens": n, "documents": 1, "sha256": str(i)})
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
    with pytest.raises(DataError, match="bytes, the manifest says"):
        with open(tmp_path / "d" / "train-000001.bin", "r+b") as f:
            f.truncate(100)
        open_prepared(tmp_path / "d")


def test_train_on_prepared_dir_resumes_exactly(tmp_path, docs):
    import shutil

    import torch

    from gptforge import checkpoint as ckpt
    from gptforge.data import DataConfig
    from gptforge.model import GPTConfig
    from gptforge.train import RunConfig, TrainConfig, train

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

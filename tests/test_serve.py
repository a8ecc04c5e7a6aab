"""`gptforge serve` end to end: a real server process, the OpenAI client, and a real headless browser;
and in-process (Starlette's TestClient, or the ASGI app called by hand where a test must choose the
moment a client leaves or a generation is under way; moments are chosen by events, never by clocks)."""

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from browser import browser  # noqa: F401  (fixture)
from clirun import run

from gptforge.checkpoint import save_weights
from gptforge.models.gpt2 import GPT, GPTConfig
from gptforge.serve import MAX_BODY_BYTES, AllowedHosts, Engine, Limits, RequestError, host_name, load_engine, make_app
from gptforge.tokenizer import GPT2Tokenizer, get_tokenizer

openai = pytest.importorskip("openai", reason="needs the openai client: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))


@pytest.fixture(scope="module")
def server_run(tmp_path_factory):
    """`gptforge serve` on a free loopback port, in its own process; yields its base URL and start-up lines.
    Afterwards SIGTERM must stop it: killed by that signal (uvicorn re-raises it after a graceful
    shutdown), no traceback, and the port closed."""
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_weights(path, tiny_model(), "gpt2")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "gptforge", "serve", str(path), "--port", "0",
                             "--device", "cpu", "--max-tokens-limit", "64", "--max-prompt-chars", "500",
                             "--max-concurrent", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, match = [], None
    try:
        for line in proc.stdout:  # the server prints its address once it listens
            seen.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match or len(seen) > 50:
                break
        assert match, "".join(seen)
        yield f"http://127.0.0.1:{match.group(1)}", seen
    finally:
        proc.terminate()
        try:
            rest, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()  # a no-op once it has exited; never leave a server behind a failed assertion
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, rest)
    assert "Traceback" not in rest and "error" not in rest.lower(), rest
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10).close()


@pytest.fixture(scope="module")
def server(server_run):
    return server_run[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion_has_the_openai_shape(client):
    reply = client.completions.create(model="tiny", prompt="Every effort moves you", max_tokens=6, temperature=0)
    assert reply.object == "text_completion" and reply.model == "tiny" and reply.id.startswith("cmpl-")
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    assert reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 6 and reply.usage.total_tokens == 10
    # the same as the library's own greedy sampling
    from gptforge.generate import SampleConfig, sample_text

    expected = sample_text(tiny_model(), GPT2Tokenizer(), "Every effort moves you", SampleConfig(6, 0.0))[0]
    assert choice.text == expected


def test_stream_arrives_in_pieces_and_adds_up(client):
    full = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0.9, seed=5).choices[0]
    chunks = list(client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0.9, seed=5,
                                            stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert len([t for t in texts if t]) > 1  # streamed, not one block
    assert "".join(texts) == full.text
    assert chunks[-1].choices[0].finish_reason == full.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(server):
    with httpx.stream("POST", server + "/v1/completions", timeout=30,
                      json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_seed_repeats_and_top_p_top_k_are_taken(client):
    def ask(**kw):
        return client.completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=1.5, **kw).choices[0]

    assert ask(seed=1).text == ask(seed=1).text
    # top_k=1 is greedy whatever the temperature
    greedy = client.completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=0).choices[0].text
    assert ask(seed=2, extra_body={"top_k": 1}).text == greedy
    assert ask(seed=3, top_p=1e-6).text == greedy  # so is a tiny nucleus


@pytest.mark.parametrize("kwargs,param,message", [
    ({"max_tokens": 65}, "max_tokens", "max_tokens must be between 1 and 64"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be between 1 and 64"),
    ({"prompt": "word " * 200}, "prompt", "prompt is 1000 characters; the limit is 500"),
    ({"prompt": "a b " * 20}, "prompt", "this model reads at most 32"),
    ({"temperature": 3}, "temperature", "temperature must be between 0.0 and 2.0"),
    ({"top_p": 0}, "top_p", "top_p must be above 0"),
    ({"extra_body": {"top_k": "many"}}, "top_k", "top_k must be an integer"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"n": 2}, "n", "not supported"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate", "unknown parameter"),
    ({"seed": 2**63}, "seed", "seed must be between 0 and 9223372036854775807, got 9223372036854775808"),
    ({"seed": 2**64}, "seed", "seed must be between 0 and 9223372036854775807"),
    ({"seed": -1}, "seed", "seed must be between 0 and 9223372036854775807, got -1"),
    ({"seed": 1.5}, "seed", "seed must be an integer"),
    ({"max_tokens": 10**400}, "max_tokens", "max_tokens must be between 1 and 64"),
    ({"extra_body": {"stream_options": {"a": [[[[[[[[1]]]]]]]]}}}, None, "nests arrays and objects 10 deep"),
])
def test_bad_requests_get_400_and_a_json_error(client, kwargs, param, message):
    args = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    assert err.value.status_code == 400
    body = err.value.body
    assert message in body["message"] and body["param"] == param and body["type"] == "invalid_request_error"
    assert "\n" not in body["message"]


def test_the_largest_seed_is_taken(client):
    ask = dict(model="tiny", prompt="Hi", max_tokens=4, temperature=1.0)
    assert client.completions.create(seed=2**63 - 1, **ask).usage.completion_tokens > 0
    assert client.completions.create(seed=0, **ask).usage.completion_tokens > 0


@pytest.mark.parametrize("content,status,message", [
    (b'{"prompt": "Hi", ', 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"prompt": 5}', 400, "prompt must be a string"),
    (b'{"prompt": "Hi", "stream": "yes"}', 400, "stream must be true or false"),
    (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "the limit is 1048576"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests arrays and objects 100001 deep"),
    (b"[" * 500_000, 400, "nests arrays and objects 500000 deep; the limit is 8"),
    (b'{"prompt": "[[[[[[[[[[[[[[[[\\"]]]", "max_tokens": 2}', 200, None),  # brackets in a string are text
    (b'{"seed": 1' + b"0" * 5000 + b"}", 400, "a number of more than 4300 digits"),
    (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
])
def test_malformed_bodies(server, content, status, message):
    r = httpx.post(server + "/v1/completions", content=content, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message is None or message in r.json()["error"]["message"]


def test_a_chunked_body_over_the_limit_gets_413_from_the_real_server(server):
    """No Content-Length to check up front: the server counts while it reads."""
    piece = b"x" * (1 << 16)

    def body():  # MAX_BODY_BYTES + 1 bytes, so the server reads all of it and the answer comes back cleanly
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // len(piece)):
            yield piece
        yield b'"}'

    r = httpx.post(server + "/v1/completions", content=body(), timeout=30, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "request body is over 1048576 bytes" in r.json()["error"]["message"]
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"


def test_startup_line_states_the_kv_cache_memory(server_run):
    _, lines = server_run
    memory = next(line for line in lines if line.startswith("memory:"))
    # 2 * n_layers 1 * context 32 * (kv heads 2 * head_dim 16) * 4 bytes (fp32) = 8 KiB; 8 at once = 64 KiB
    assert ("each generation holds a 8 KiB KV cache (2 * 1 layers * 32 positions * 2 key/value heads * 16 head_dim * "
            "4 bytes)") in memory
    assert "at most 8 at once (--max-concurrent): 64 KiB" in memory


def test_help_states_the_memory_per_request(capsys):
    code, out, err = run(["serve", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and "--max-concurrent" in text and "--allowed-host" in text
    assert "full-context KV cache of 2 * n_layers * positions * n_kv_heads * head_dim * bytes per element" in text


@pytest.mark.parametrize("args,message", [
    (["--max-concurrent", "0"], "--max-concurrent must be at least 1, got 0"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit must be at least 1, got 0"),
    (["--max-prompt-chars", "-5"], "--max-prompt-chars must be at least 1, got -5"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--port", "-1"], "--port must be between 0 and 65535, got -1"),
    (["--allowed-host", "a b:c:d"], "--allowed-host 'a b:c:d' is not a host name"),
])
def test_serve_flags_out_of_range_are_one_line(args, message, capsys, tmp_path):
    code, out, err = run(["serve", str(tmp_path / "never-read.safetensors"), *args], capsys)
    assert code == 1 and message in err and err.count("\n") == 1, err


def test_unknown_routes_answer_json(server):
    assert httpx.get(server + "/v1/completions", timeout=10).status_code == 405
    r = httpx.get(server + "/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("/nothing is not served: this server has")
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 404 and "it has no chat template" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"


def test_concurrent_clients_get_their_own_outputs(client):
    """Eight requests at once (half streamed) give exactly what each gives alone."""
    requests = [dict(prompt=p, seed=i, temperature=1.0, max_tokens=24, stream=i % 2 == 1)
                for i, p in enumerate(["The cat", "A dog", "In the", "Every", "Once upon", "It was", "Why", "We"])]

    def ask(kw):
        reply = client.completions.create(model="tiny", **kw)
        return "".join(c.choices[0].text for c in reply) if kw["stream"] else reply.choices[0].text

    alone = [ask(kw) for kw in requests]
    assert len(set(alone)) == len(alone)  # distinct answers, so a mix-up would show
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone


def test_client_hanging_up_mid_stream_leaves_the_server_serving(server, client):
    with httpx.stream("POST", server + "/v1/completions", timeout=30,
                      json={"prompt": "Hi", "max_tokens": 64, "temperature": 1.0, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith("data: ")
    # closed after one event; the next request is answered in full
    reply = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"


def test_engine_limits_in_process():
    engine = Engine(tiny_model(), GPT2Tokenizer(), "tiny", limits=Limits(max_tokens=8, max_prompt_chars=50))
    req = engine.parse(b'{"prompt": "", "max_tokens": 8, "temperature": 0}')
    assert req.prompt_ids == [50256]  # an empty prompt starts a new document
    with pytest.raises(RequestError, match="between 1 and 8"):
        engine.parse(b'{"prompt": "x", "max_tokens": 9}')
    with pytest.raises(RequestError, match="an integer"):
        engine.parse(b'{"prompt": "x", "max_tokens": 2.5}')
    reply = engine.complete(req)
    # this greedy tiny model never ends a text, so the full limit is produced, and not one token more
    assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}
    assert reply["choices"][0]["finish_reason"] == "length" and reply["choices"][0]["text"]
    assert len(list(engine.tokens(req))) == 8
    shorter = engine.complete(engine.parse(b'{"prompt": "x", "max_tokens": 3, "temperature": 0}'))
    assert shorter["usage"]["completion_tokens"] == 3 and shorter["choices"][0]["finish_reason"] == "length"


def test_cli_refuses_a_busy_port(server, tmp_path):
    port = server.rsplit(":", 1)[1]
    path = tmp_path / "m.safetensors"
    save_weights(path, tiny_model(), "gpt2")
    proc = subprocess.run([sys.executable, "-m", "gptforge", "serve", str(path), "--port", port],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_page_streams_a_continuation_in_the_browser(server, browser, client):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    assert "tiny" in browser.title
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Every effort moves you")
    for field, value in (("temperature", "0"), ("max_tokens", "20"), ("top_k", "0"), ("top_p", "1")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30, poll_frequency=0.05).until(
        lambda b: b.find_element(By.ID, "output").get_attribute("data-done") == "true")
    shown = browser.find_element(By.ID, "completion").text
    chunks = int(browser.find_element(By.ID, "output").get_attribute("data-chunks"))
    status = browser.find_element(By.ID, "status").text
    expected = client.completions.create(model="tiny", prompt="Every effort moves you", max_tokens=20,
                                         temperature=0).choices[0].text
    assert chunks > 1 and "finish: length" in status, status
    assert shown == expected.strip() or shown == expected  # .text trims surrounding whitespace
    assert browser.find_element(By.ID, "echo").text == "Every effort moves you"

    # a rejected request shows the server's error on the page
    browser.execute_script("document.getElementById('prompt').value = 'word '.repeat(120);")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda b: "error 400" in b.find_element(By.ID, "status").text)
    assert "prompt is 600 characters; the limit is 500" in browser.find_element(By.ID, "status").text


def test_engine_decodes_with_the_kv_cache_and_matches_uncached_generation():
    """Greedy tokens from the engine (prefill + cached steps) equal generate() without a cache, also
    past the 32-token context, where both recompute the cropped context."""
    from gptforge.generate import SampleConfig, generate

    model = tiny_model().eval()
    engine = Engine(model, GPT2Tokenizer(), "tiny", limits=Limits(max_tokens=64, max_prompt_chars=500))
    req = engine.parse(b'{"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0}')
    got = list(engine.tokens(req))
    want = generate(model, torch.tensor([req.prompt_ids]), SampleConfig(max_new_tokens=40), use_cache=False)[0]
    want = want[: want.index(50256)] if 50256 in want else want  # the engine stops before end-of-text
    assert got == want and len(got) > 0


# ----------------------------------------------------------------------------- in process


def engine_of(max_concurrent: int = 4) -> Engine:
    return Engine(tiny_model(), GPT2Tokenizer(), "tiny", limits=Limits(max_tokens=20, max_prompt_chars=500,
                                                                       max_concurrent=max_concurrent))


def app_client(engine: Engine):
    from starlette.testclient import TestClient

    return TestClient(make_app(engine), base_url="http://localhost:8000")


def count_tokens(engine: Engine, after=None) -> list[int]:
    """Record each token the engine produces; after(n) runs (in the generating thread) after the n-th."""
    produced, real = [], engine.tokens

    def tokens(req):
        for tok in real(req):
            produced.append(tok)
            if after:
                after(len(produced))
            yield tok

    engine.tokens = tokens
    return produced


GREEDY = {"prompt": "Hi", "max_tokens": 20, "temperature": 0}


class Client:
    """One HTTP request played by hand against the ASGI app: the body in `chunks`, then a client that
    stays until `left` is set (by the test, from any thread) and then reports http.disconnect."""

    def __init__(self, body: dict | bytes | None = None, headers=None, chunks=None, path="/v1/completions",
                 method="POST"):
        body = json.dumps(body).encode() if isinstance(body, dict) else body or b""
        headers = {"host": "localhost:8000", "content-type": "application/json", **(headers or {})}
        self.scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                      "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                      "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
                      "server": ("127.0.0.1", 8000),
                      "headers": [(k.encode(), v.encode()) for k, v in headers.items() if v is not None]}
        self.chunks = iter(chunks if chunks is not None else [body])  # each sent with more_body, then an end
        self.left = threading.Event()
        self.reads, self.sent, self.body_done, self.on_send = 0, [], False, None

    async def receive(self):
        self.reads += 1
        chunk = next(self.chunks, None)
        if chunk is not None:
            return {"type": "http.request", "body": chunk, "more_body": True}
        if not self.body_done:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.left.is_set():
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # still connected: only a cancellation (Starlette's polling) ends this

    async def send(self, message):
        self.sent.append(message)
        if self.on_send:
            self.on_send(self)

    async def call(self, app):
        await app(self.scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return self.sent[0]["status"] if self.sent else None

    @property
    def headers(self) -> dict:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def test_a_model_with_its_own_tokenizer_is_served(tmp_path, capsys):
    """tokenizer train -> train --tokenizer -> serve: the tokenizer comes from the checkpoint's metadata."""
    from pydoc_data.topics import topics

    from gptforge.generate import SampleConfig, sample_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    code, out, err = run(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")],
                         capsys)
    assert code == 0, err
    tok = get_tokenizer(str(tmp_path / "tok"))
    code, out, err = run(["train", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "run"),
                          "--preset", "tiny", "--context-length", "32", "--batch-size", "4", "--max-steps", "2",
                          "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "4", "--device", "cpu",
                          "--no-progress"], capsys)
    assert code == 0, err
    (tmp_path / "tok" / "tokenizer.json").unlink()  # the checkpoint alone must be enough

    engine = load_engine(tmp_path / "run", "cpu")
    assert engine.tokenizer.name == tok.name and engine.name == "run"
    with app_client(engine) as client:
        r = client.post("/v1/completions", json={"prompt": "The statement", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["usage"]["prompt_tokens"] == len(tok.encode("The statement")) < len("The statement")
    expected = sample_text(engine.model, tok, "The statement", SampleConfig(6, 0.0))[0]
    assert reply["choices"][0]["text"] == expected and reply["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8", "multipart/form-data; boundary=x",
                                          "application/x-www-form-urlencoded", "application/jsonp", None])
def test_posts_not_declared_json_get_415_and_generate_nothing(content_type):
    """A web page can send these to any address without a CORS preflight; application/json it cannot."""
    engine = engine_of()
    produced = count_tokens(engine)
    client = asyncio.run(Client(GREEDY, headers={"content-type": content_type}).call(make_app(engine)))
    error = json.loads(client.body)["error"]
    assert client.status == 415 and error["param"] == "Content-Type" and produced == []
    assert f"Content-Type must be application/json, got {content_type or 'none'!r}" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON; charset=utf-8"])
def test_json_posts_are_taken(content_type):
    with app_client(engine_of()) as client:
        r = client.post("/v1/completions", content=json.dumps(GREEDY), headers={"Content-Type": content_type})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20


def test_cors_preflight_is_never_granted():
    """So a page elsewhere can never send application/json here: the browser asks first and is refused."""
    client = asyncio.run(Client(headers={"origin": "https://evil.example", "access-control-request-method": "POST",
                                         "access-control-request-headers": "content-type"},
                                method="OPTIONS").call(make_app(engine_of())))
    assert client.status == 405 and not any(k.startswith("access-control-") for k in client.headers)


@pytest.mark.parametrize("host,ok", [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("[::1]", True),
    ("LocalHost.:8000", True),
    ("evil.example", False), ("evil.example:8000", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io:8000", False), ("192.168.1.5:8000", False), ("::1", False), ("[::1", False),
    ("localhost:8000:1", False), ("localhost:", False), ("", False), (None, False),
])
def test_host_header_must_name_this_server(host, ok):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name, which is in the Host header."""
    app = make_app(engine_of())
    for method, path, good in (("GET", "/", 200), ("GET", "/v1/models", 200), ("POST", "/v1/completions", 200)):
        client = asyncio.run(Client(GREEDY, headers={"host": host}, path=path, method=method).call(app))
        if ok:
            assert client.status == good, (path, client.body)
        else:
            error = json.loads(client.body)["error"]
            assert client.status == 403 and error["param"] == "Host", (path, client.body)
            assert f"Host {host or 'none'!r} is not a name this server answers to" in error["message"]
            assert "--allowed-host" in error["message"] and "\n" not in error["message"]


def test_allowed_hosts_follow_the_listening_address():
    loopback = AllowedHosts.serving("127.0.0.1")
    assert loopback.accepts("localhost:8000") and not loopback.accepts("192.168.1.5:8000")
    lan = AllowedHosts.serving("192.168.1.5")
    assert lan.accepts("192.168.1.5:8000") and lan.accepts("localhost") and not lan.accepts("10.0.0.1")
    assert AllowedHosts.serving("::1").accepts("[::1]:8000")
    every = AllowedHosts.serving("0.0.0.0")  # the machine's own addresses are not listed: any IP literal will do
    assert every.accepts("10.0.0.7:8000") and every.accepts("[fe80::1]:8000") and every.accepts(socket.gethostname())
    assert not every.accepts("evil.example") and not AllowedHosts.serving("::").accepts("evil.example:80")
    proxy = AllowedHosts.serving("127.0.0.1", ["gpt.example.org", "[::2]:443"])
    assert proxy.accepts("GPT.example.org:443") and proxy.accepts("[::2]") and not proxy.accepts("example.org")
    assert host_name("[::1]:8000") == "::1" and host_name("Example.ORG.:80") == "example.org"

    app = make_app(engine_of(), proxy)
    assert asyncio.run(Client(GREEDY, headers={"host": "gpt.example.org"}).call(app)).status == 200
    assert asyncio.run(Client(GREEDY, headers={"host": "other.example.org"}).call(app)).status == 403


def test_an_endless_chunked_body_is_cut_off_at_the_limit():
    """Read incrementally: the 17th 64 KiB chunk passes 1 MiB and nothing more is read."""
    piece = b"x" * (1 << 16)
    chunks = (piece for _ in range(200))  # 12.5 MiB if read to the end
    client = asyncio.run(Client(chunks=chunks).call(make_app(engine_of())))
    assert client.status == 413 and "request body is over 1048576 bytes" in json.loads(client.body)["error"]["message"]
    assert client.reads == MAX_BODY_BYTES // len(piece) + 1

    declared = Client(b"{}", headers={"content-length": str(MAX_BODY_BYTES + 1)})
    asyncio.run(declared.call(make_app(engine_of())))
    assert declared.status == 413 and declared.reads == 0  # refused on its declared length, unread


def test_generations_beyond_max_concurrent_get_503_with_retry_after():
    engine = engine_of(max_concurrent=1)
    entered, release = threading.Event(), threading.Event()

    def hold(n):  # the first generation stops after one token until the test lets it go on
        if n == 1:
            entered.set()
            assert release.wait(120), "the test never let the first generation go on"

    produced = count_tokens(engine, hold)
    app = make_app(engine)

    async def scenario():
        first = Client(GREEDY)
        running = asyncio.create_task(first.call(app))
        assert await asyncio.to_thread(entered.wait, 120)  # the first generation holds the only slot
        busy = [await Client(GREEDY).call(app), await Client({**GREEDY, "stream": True}).call(app)]
        release.set()
        await running
        return first, busy, await Client(GREEDY).call(app)

    first, busy, after = asyncio.run(scenario())
    for client in busy:
        error = json.loads(client.body)["error"]
        assert client.status == 503 and client.headers["retry-after"] == "1"
        assert "1 generation is running, the most this server runs at once (gptforge serve --max-concurrent)" \
            in error["message"]
    assert first.status == 200 and json.loads(first.body)["usage"]["completion_tokens"] == 20
    assert after.status == 200 and len(produced) == 40  # the slot came back; the refused ones generated nothing


def test_generation_stops_when_a_waiting_client_leaves():
    """A non-streaming client that hangs up after 3 tokens: the check between tokens stops the generation."""
    engine = engine_of(max_concurrent=1)
    client = Client(GREEDY)
    produced = count_tokens(engine, lambda n: n == 3 and client.left.set())
    app = make_app(engine)
    asyncio.run(client.call(app))
    assert len(produced) == 3 and client.status == 499
    produced.clear()  # the same request from a client that stays runs to its limit, in the freed slot
    stays = asyncio.run(Client(GREEDY).call(app))
    assert stays.status == 200 and len(produced) == 20 and json.loads(stays.body)["usage"]["completion_tokens"] == 20


def test_stream_stops_when_the_client_goes_away():
    engine = engine_of(max_concurrent=1)
    produced = count_tokens(engine)
    app = make_app(engine)
    client = Client({**GREEDY, "stream": True})
    client.on_send = lambda c: sum(bool(m.get("body")) for m in c.sent) == 3 and c.left.set()
    asyncio.run(client.call(app))
    assert client.status == 200 and len(produced) == 3
    produced.clear()
    stays = asyncio.run(Client({**GREEDY, "stream": True}).call(app))
    assert stays.status == 200 and len(produced) == 20 and stays.body.endswith(b"data: [DONE]\n\n")


def test_a_model_too_small_for_its_tokenizer_is_one_line(tmp_path, capsys):
    path = tmp_path / "small.safetensors"
    save_weights(path, GPT(GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=1)), "gpt2")
    code, out, err = run(["serve", str(path), "--port", "0", "--device", "cpu"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "the model has 300 token ids, fewer than its gpt2 tokenizer's 50257" in err

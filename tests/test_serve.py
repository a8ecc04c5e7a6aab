"""`gptforge serve` end to end: a real server process, the OpenAI client, and a real headless browser."""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from browser import browser  # noqa: F401  (fixture)

from gptforge.checkpoint import save_weights
from gptforge.model import GPT, GPTConfig
from gptforge.serve import Engine, Limits, RequestError
from gptforge.tokenizer import GPT2Tokenizer

openai = pytest.importorskip("openai", reason="needs the openai client: pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`gptforge serve` on a free loopback port, in its own process; yields its base URL."""
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_weights(path, tiny_model(), "gpt2")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "gptforge", "serve", str(path), "--port", "0",
                             "--device", "cpu", "--max-tokens-limit", "64", "--max-prompt-chars", "500"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen, match = [], None
        for line in proc.stdout:  # the server prints its address once it listens
            seen.append(line)
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match or len(seen) > 50:
                break
        assert match, "".join(seen)
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()  # SIGTERM stops the server promptly
        assert proc.wait(timeout=15) is not None


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
])
def test_bad_requests_get_400_and_a_json_error(client, kwargs, param, message):
    args = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    assert err.value.status_code == 400
    body = err.value.body
    assert message in body["message"] and body["param"] == param and body["type"] == "invalid_request_error"


@pytest.mark.parametrize("content,status,message", [
    (b'{"prompt": "Hi", ', 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"prompt": 5}', 400, "prompt must be a string"),
    (b'{"prompt": "Hi", "stream": "yes"}', 400, "stream must be true or false"),
    (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "the limit is 1048576"),
])
def test_malformed_bodies(server, content, status, message):
    r = httpx.post(server + "/v1/completions", content=content, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]["message"]


def test_unknown_routes_answer_json(server):
    assert httpx.get(server + "/v1/completions", timeout=10).status_code == 405
    r = httpx.get(server + "/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
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
    assert reply["usage"]["completion_tokens"] <= 8


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

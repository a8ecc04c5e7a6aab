"""`gptforge serve`: a local web page and an OpenAI-style completions API for a trained model.

Built on Starlette (routing, requests, streaming responses) served by uvicorn: both small, widely
used and maintained, and together they give HTTP/1.1 keep-alive, chunked streaming and clean
client-disconnect handling that a hand-written stdlib server would have to re-implement.

``POST /v1/completions`` takes the fields of OpenAI's completions API (``prompt``, ``max_tokens``,
``temperature``, ``top_p``, ``stream``, ``seed``, plus ``top_k``) and answers in its shape; with
``"stream": true`` the answer is server-sent events, one ``data: {...}`` per piece of text and a
final ``data: [DONE]``. Requests run concurrently: each has its own token buffer and random
generator, and the model's forward pass is taken under a lock one token at a time, so clients
take turns token by token and never see each other's tokens.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import escape
from importlib import resources
from pathlib import Path

import torch

from .config import ConfigError
from .generate import SampleConfig, decode_one_token, next_token, prefill
from .model import KVCache

MAX_BODY_BYTES = 1 << 20
# Request fields we take; the rest of OpenAI's fields are accepted only at their "off" values.
ACCEPTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stream", "seed", "user"}
OFF_VALUES = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, 0), "frequency_penalty": (0,),
              "presence_penalty": (0,), "stop": (None, [], ""), "suffix": (None, ""), "logit_bias": (None, {}),
              "stream_options": (None, {}, {"include_usage": False})}


class RequestError(ValueError):
    """A request the server rejects with HTTP `status` and an OpenAI-style JSON error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Limits:
    max_tokens: int = 256  # the largest max_tokens a request may ask for
    max_prompt_chars: int = 20_000  # checked before tokenizing


@dataclass
class Request:
    prompt_ids: list[int]
    sample: SampleConfig
    seed: int | None
    stream: bool


class Engine:
    """A model, its tokenizer and a lock: turns requests into streams of text."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, device: torch.device | str = "cpu",
                 limits: Limits | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.limits = limits or Limits()
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ request checking

    def parse(self, body: bytes) -> Request:
        """A request body -> Request, or RequestError naming the field at fault."""
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        for key, value in data.items():
            if key in OFF_VALUES:
                if value not in OFF_VALUES[key]:
                    raise RequestError(f"{key}={value!r} is not supported by this server", key)
            elif key not in ACCEPTED:
                raise RequestError(f"unknown parameter {key!r}", key)

        prompt = data.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", "prompt")
        if len(prompt) > self.limits.max_prompt_chars:
            raise RequestError(f"prompt is {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}",
                               "prompt")
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]
        ctx = self.model.cfg.context_length
        if len(ids) > ctx:
            raise RequestError(f"prompt is {len(ids)} tokens; this model reads at most {ctx}", "prompt")

        max_tokens = _number(data, "max_tokens", 16, int, 1, self.limits.max_tokens)
        temperature = _number(data, "temperature", 1.0, float, 0.0, 2.0)
        top_p = _number(data, "top_p", 1.0, float, 0.0, 1.0)
        if top_p == 0.0:
            raise RequestError("top_p must be above 0", "top_p")
        top_k = _number(data, "top_k", None, int, 1, None)
        seed = _number(data, "seed", None, int, None, None)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", "stream")
        sample = SampleConfig(max_tokens, temperature, top_k, None if top_p >= 1.0 else top_p)
        return Request(ids, sample, seed, stream)

    # ------------------------------------------------------------------ generation

    def tokens(self, req: Request) -> Iterator[int]:
        """New token ids one at a time; stops after max_tokens or at the end-of-text token (not yielded)."""
        idx = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        generator = None
        if req.sample.temperature > 0:
            generator = torch.Generator(device=self.device)
            if req.seed is not None:
                generator.manual_seed(req.seed)
            else:
                generator.seed()
        param = next(self.model.parameters())
        cache = KVCache(self.model.cfg, 1, param.device, param.dtype)  # this request's keys and values
        for i in range(req.sample.max_new_tokens):
            with self.lock, torch.no_grad():  # prefill the prompt, then one cached step per token
                logits = prefill(self.model, idx, cache) if i == 0 else decode_one_token(self.model, idx, cache)
                tok = next_token(logits, req.sample, generator)  # (1, 1)
            if int(tok) == self.tokenizer.eot_id:
                return
            yield int(tok)
            idx = torch.cat([idx, tok], dim=1)

    def pieces(self, req: Request, usage: dict) -> Iterator[str]:
        """The continuation as text pieces, each ending on a whole character; fills usage and finish_reason."""
        ids: list[int] = []
        sent = ""
        usage.update(prompt_tokens=len(req.prompt_ids), completion_tokens=0, finish_reason="stop")
        for tok in self.tokens(req):
            ids.append(tok)
            usage["completion_tokens"] = len(ids)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                continue
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        if len(ids) == req.sample.max_new_tokens:
            usage["finish_reason"] = "length"
        text = self.tokenizer.decode(ids)
        if len(text) > len(sent):
            yield text[len(sent):]

    # ------------------------------------------------------------------ OpenAI-shaped answers

    def _shell(self, cid: str, created: int) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": self.name}

    def complete(self, req: Request) -> dict:
        usage: dict = {}
        text = "".join(self.pieces(req, usage))
        reply = self._shell(f"cmpl-{uuid.uuid4().hex}", int(time.time()))
        reply["choices"] = [{"text": text, "index": 0, "logprobs": None, "finish_reason": usage.pop("finish_reason")}]
        reply["usage"] = dict(usage, total_tokens=usage["prompt_tokens"] + usage["completion_tokens"])
        return reply

    def stream(self, req: Request) -> Iterator[str]:
        """Server-sent events: one chunk per text piece, a last chunk with finish_reason, then [DONE]."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage: dict = {}
        for piece in self.pieces(req, usage):
            chunk = dict(self._shell(cid, created), choices=[{"text": piece, "index": 0, "logprobs": None,
                                                               "finish_reason": None}])
            yield f"data: {json.dumps(chunk)}\n\n"
        last = dict(self._shell(cid, created), choices=[{"text": "", "index": 0, "logprobs": None,
                                                          "finish_reason": usage.pop("finish_reason")}])
        yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"


def _number(data: dict, key: str, default, typ: type, low, high):
    value = data.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(value):
        raise RequestError(f"{key} must be {'an integer' if typ is int else 'a number'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"{key} must be {bounds}, got {value!r}", key)
    return typ(value)


def error_body(message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


def page() -> str:
    return resources.files("gptforge").joinpath("serve_page.html").read_text(encoding="utf-8")


def make_app(engine: Engine):
    """The Starlette application: GET / (the page), GET /v1/models, POST /v1/completions."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    html = page().replace("{{MODEL}}", escape(engine.name)).replace("{{MAX_TOKENS}}", str(engine.limits.max_tokens))

    async def index(request: HTTPRequest):
        return HTMLResponse(html)

    async def models(request: HTTPRequest):
        return JSONResponse({"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                                          "owned_by": "gptforge"}]})

    async def completions(request: HTTPRequest):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return JSONResponse(error_body(f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}"),
                                status_code=413)
        try:
            req = engine.parse(await request.body())
        except RequestError as e:
            return JSONResponse(error_body(str(e), e.param), status_code=e.status)
        if req.stream:
            return StreamingResponse(engine.stream(req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await run_in_threadpool(engine.complete, req))

    async def http_error(request: HTTPRequest, exc: HTTPException):
        return JSONResponse(error_body(exc.detail), status_code=exc.status_code)

    routes = [Route("/", index), Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); an address in use is a one-line user error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    return sock


def serve(source: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          limits: Limits | None = None, log=print) -> None:
    """Load the model in source and serve it until interrupted."""
    import uvicorn

    from . import checkpoint as ckpt
    from .tokenizer import get_tokenizer
    from .train import pick_device
    from .weights import load_any

    sock = listen(host, port)  # before loading, so a busy port fails fast
    dev = pick_device(device)
    model, meta = load_any(source, dev)
    path = Path(source).resolve()  # the model's name: its run directory's, else the file's or directory's
    path = path.parent if path.name == ckpt.WEIGHTS else path
    path = path.parent.parent if path.parent.name == ckpt.CHECKPOINTS else path
    name = path.stem if path.is_file() else path.name
    engine = Engine(model, get_tokenizer(meta.get("tokenizer", "gpt2")), name, dev, limits)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}, not loopback: anyone who can reach this machine can use the model")
    log(f"serving {name} at http://{shown}:{bound}/  (API: POST http://{shown}:{bound}/v1/completions)")
    config = uvicorn.Config(make_app(engine), log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])

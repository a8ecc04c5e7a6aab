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

What a web page the user visits could do with a server on localhost is shut off: POST bodies must
be ``application/json`` (a page can only send that after a CORS preflight, which this server never
grants), and the Host header must name this server (loopback, the ``--host`` address or an
``--allowed-host``), so a DNS-rebinding page cannot read the answers. Bodies are capped while they
are read (chunked ones too), JSON nesting is bounded before parsing, at most ``max_concurrent``
generations run at once (each holds a full-context KV cache; others get 503 with Retry-After), and
a generation stops when its client goes away.
"""

from __future__ import annotations

import json
import math
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from itertools import accumulate
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import checkpoint as ckpt
from ..config import ConfigError, check_fields, opt
from ..devices import device_opt, pick_device
from ..errors import UserError
from ..generate import SampleConfig, cache_length, iter_tokens, sampling_generator
from ..models import KVCache
from ..tokenizer import tokenizer_opt
from ..weights import load_for_text
from .hosts import LOOPBACK, AllowedHosts, HostCheck, error_body, host_name

__all__ = ["MAX_BODY_BYTES", "AllowedHosts", "Engine", "Limits", "RequestError", "ServeConfig", "host_name",
           "load_engine", "make_app", "serve"]

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 8  # arrays and objects inside each other in a request body; the fields we take need 2
MAX_SEED = 2**63 - 1  # seeds are 0 .. 2^63 - 1 (OpenAI's int64; torch.Generator takes them all)
# Request fields we take; the rest of OpenAI's fields are accepted only at their "off" values.
ACCEPTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stream", "seed", "user"}
OFF_VALUES = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, 0), "frequency_penalty": (0,),
              "presence_penalty": (0,), "stop": (None, [], ""), "suffix": (None, ""), "logit_bias": (None, {}),
              "stream_options": (None, {}, {"include_usage": False})}


class RequestError(UserError):
    """A request the server rejects with HTTP `status` and an OpenAI-style JSON error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Limits:
    max_tokens: int = 256  # the largest max_tokens a request may ask for
    max_prompt_chars: int = 20_000  # checked before tokenizing
    max_concurrent: int = 4  # generations at once, each holding a full-context KV cache (Engine.cache_bytes)


@dataclass
class ServeConfig:
    """Where `gptforge serve` listens, which Host headers it answers, and how much requests may ask for."""

    host: str = opt("127.0.0.1", "Address to listen on; the default serves this machine only (loopback). Requests "
                                 "must name a loopback host or this address in their Host header (0.0.0.0 or ::: any "
                                 "IP address too).")
    port: int = opt(8000, "Port to listen on; 0 picks a free one.", low=0, high=65535, says='between 0 and 65535')
    allowed_host: list[str] = field(default_factory=list, metadata={
        "help": "Another name the Host header may give, e.g. the public name of a reverse proxy in front; "
                "repeatable. Other names get 403, which stops DNS-rebinding pages.", "metavar": "NAME"})
    max_tokens_limit: int = opt(256, "Largest max_tokens a request may ask for; larger requests are rejected.", low=1)
    max_prompt_chars: int = opt(20_000, "Longest prompt accepted, in characters (prompts are also limited to the "
                                        "model's context).", low=1)
    max_concurrent: int = opt(4, "Generations run at once; more get 503 with Retry-After. Each holds a full-context "
                                 "KV cache of 2 * n_layers * positions * n_kv_heads * head_dim * bytes per element "
                                 "(GPT-2 124M in fp32: 72 MiB); the start-up line prints this model's.", low=1)
    device: str = device_opt()
    tokenizer: str | None = tokenizer_opt()

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_tokens_limit, self.max_prompt_chars, self.max_concurrent)


def size(n: float) -> str:
    """Bytes in binary units: 512 bytes, 8 KiB, 37.5 MiB."""
    units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
    while n >= 1024 and len(units) > 1:
        n, units = n / 1024, units[1:]
    return f"{n:.4g} {units[0]}"


@dataclass
class Request:
    prompt_ids: list[int]
    sample: SampleConfig
    seed: int | None
    stream: bool


class Engine:
    """A model, its tokenizer, a lock and the generation slots: turns requests into streams of text."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, device: torch.device | str = "cpu",
                 limits: Limits | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.limits = limits or Limits()
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(self.limits.max_concurrent)  # one per running generation

    def cache_positions(self) -> int:
        """Positions one request's KV cache holds at most: the context (learned positions), or the longest
        prompt plus the largest max_tokens (rotary positions)."""
        return cache_length(self.model.cfg, self.model.cfg.context_length + self.limits.max_tokens)

    def cache_bytes(self) -> int:
        dtype = next(self.model.parameters()).dtype
        return KVCache.nbytes(self.model.cfg, dtype, max_len=self.cache_positions())  # one request's

    # ------------------------------------------------------------------ request checking

    def parse(self, body: bytes) -> Request:
        """A request body -> Request, or RequestError naming the field at fault."""
        data = read_json(body)
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
        seed = _number(data, "seed", None, int, 0, MAX_SEED)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", "stream")
        sample = SampleConfig(max_tokens, temperature, top_k, None if top_p >= 1.0 else top_p)
        return Request(ids, sample, seed, stream)

    # ------------------------------------------------------------------ generation

    def tokens(self, req: Request) -> Iterator[int]:
        """New token ids one at a time; stops after max_tokens or at a stop token (the tokenizer's eos or
        <|endoftext|>: see tokenizer.HFTokenizer), which is not yielded."""
        idx = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        generator = sampling_generator(req.sample, req.seed, self.device)
        for tok in iter_tokens(self.model, idx, req.sample, generator, lock=self.lock):  # a KV cache of its own
            if int(tok) in self.tokenizer.stop_ids:
                return
            yield int(tok)

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

    async def pieces_while(self, req: Request, usage: dict, gone: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """pieces() run in worker threads one piece at a time, stopping as soon as gone() says the client left."""

        it = self.pieces(req, usage)
        try:  # a cancelled await still waits for its thread, so `it` is never closed while it runs
            while not await gone() and (piece := await run_in_threadpool(next, it, None)) is not None:
                yield piece
        finally:
            it.close()

    # ------------------------------------------------------------------ OpenAI-shaped answers

    def _shell(self, cid: str, created: int) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": self.name}

    def reply(self, text: str, usage: dict) -> dict:
        reply = self._shell(f"cmpl-{uuid.uuid4().hex}", int(time.time()))
        reply["choices"] = [{"text": text, "index": 0, "logprobs": None, "finish_reason": usage["finish_reason"]}]
        counts = {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}
        reply["usage"] = dict(counts, total_tokens=usage["prompt_tokens"] + usage["completion_tokens"])
        return reply

    def complete(self, req: Request) -> dict:
        usage: dict = {}
        return self.reply("".join(self.pieces(req, usage)), usage)

    def event(self, cid: str, created: int, text: str, finish_reason: str | None = None) -> str:
        """One server-sent event of a streamed completion."""
        chunk = dict(self._shell(cid, created), choices=[{"text": text, "index": 0, "logprobs": None,
                                                           "finish_reason": finish_reason}])
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self, req: Request, gone: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece, a last chunk with finish_reason, then [DONE]."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage: dict = {}
        async for piece in self.pieces_while(req, usage, gone):
            yield self.event(cid, created, piece)
        yield self.event(cid, created, "", usage["finish_reason"])
        yield "data: [DONE]\n\n"


def read_json(body: bytes) -> dict:
    """A request body -> its JSON object; RequestError for bodies too big, not UTF-8, too deep or not JSON."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 ({e}); send JSON text") from None
    if (depth := nesting(text)) > MAX_DEPTH:
        raise RequestError(f"the request body nests arrays and objects {depth} deep; the limit is {MAX_DEPTH}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    except ValueError:  # an integer of more digits than Python converts
        raise RequestError(f"the request body holds a number of more than {sys.get_int_max_str_digits()} "
                           "digits; send shorter numbers") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    return data


_JSON_STRING = re.compile(r'"(?:[^"\\]+|\\.)*"?')  # a string, or the rest of the text after an unclosed quote
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting(text: str) -> int:
    """How deep arrays and objects nest in a JSON text, found without parsing it (brackets in strings are
    skipped); linear in the text, about 0.1 s for a megabyte of brackets."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _number(data: dict, key: str, default, typ: type, low, high):
    value = data.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):  # ints are compared exactly, however many digits they have
        ok = math.isfinite(value) and (typ is float or value.is_integer())
    if not ok:
        raise RequestError(f"{key} must be {'an integer' if typ is int else 'a number'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestError(f"{key} must be {bounds}, got {value!r}", key)
    return typ(value)


def page() -> str:
    return resources.files("gptforge").joinpath("serve_page.html").read_text(encoding="utf-8")


async def read_body(request) -> bytes:
    """The body of a Starlette request, read chunk by chunk and refused (413) as soon as it passes
    MAX_BODY_BYTES, whether its length was declared or it comes chunked."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(f"request body is over {MAX_BODY_BYTES} bytes; the limit is {MAX_BODY_BYTES}",
                               status=413)
    return bytes(body)


def check_content_type(header: str | None) -> None:
    """POST bodies must be declared JSON: a web page can send text/plain or a form anywhere without asking,
    but application/json only after a CORS preflight, which this server never answers."""
    media = (header or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {header or 'none'!r}; send the JSON body "
                           "with that header", "Content-Type", status=415)


def make_app(engine: Engine, hosts: AllowedHosts | None = None):
    """The Starlette application: GET / (the page), GET /v1/models, POST /v1/completions."""

    html = page().replace("{{MODEL}}", escape(engine.name)).replace("{{MAX_TOKENS}}", str(engine.limits.max_tokens))

    class SlotStream(StreamingResponse):
        """Stops the generator and frees its slot however the response ends (done, client gone, error)."""

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()
                engine.slots.release()

    async def index(request: HTTPRequest):
        return HTMLResponse(html)

    async def models(request: HTTPRequest):
        return JSONResponse({"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                                          "owned_by": "gptforge"}]})

    async def completions(request: HTTPRequest):
        try:
            check_content_type(request.headers.get("content-type"))
            req = engine.parse(await read_body(request))
        except RequestError as e:
            return JSONResponse(error_body(str(e), e.param), status_code=e.status)
        if not engine.slots.acquire(blocking=False):
            n = engine.limits.max_concurrent
            message = (f"{n} generation{'s are' if n > 1 else ' is'} running, the most this server runs at once "
                       "(gptforge serve --max-concurrent); retry in a moment")
            return JSONResponse(error_body(message, kind="server_busy"), status_code=503, headers={"Retry-After": "1"})
        if req.stream:
            return SlotStream(engine.events(req, request.is_disconnected), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache"})
        try:
            usage: dict = {}
            text = "".join([piece async for piece in engine.pieces_while(req, usage, request.is_disconnected)])
        finally:
            engine.slots.release()
        if await request.is_disconnected():  # nobody to answer; 499 as nginx logs a client that closed
            return Response(status_code=499)
        return JSONResponse(engine.reply(text, usage))

    async def http_error(request: HTTPRequest, exc: HTTPException):
        detail = exc.detail
        if exc.status_code == 404:  # say what is served instead of a bare "Not Found"
            detail = (f"{request.url.path} is not served: this server has GET /, GET /v1/models and POST "
                      "/v1/completions" + (" (a pretrained model continues text; it has no chat template)"
                                           if "chat" in request.url.path else ""))
        return JSONResponse(error_body(detail), status_code=exc.status_code)

    routes = [Route("/", index), Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
    middleware = [Middleware(HostCheck, hosts=hosts or AllowedHosts.serving("127.0.0.1"))]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


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


def load_engine(source: str | Path, device: str = "auto", limits: Limits | None = None,
                tokenizer: str | None = None) -> Engine:
    """The model in source with the tokenizer its checkpoint names or carries (or `tokenizer`), ready to serve."""

    dev = pick_device(device)
    model, tokenizer, _ = load_for_text(source, dev, tokenizer=tokenizer)
    path = Path(source).resolve()  # the model's name: its run directory's, else the file's or directory's
    path = path.parent if path.name == ckpt.WEIGHTS else path
    path = path.parent.parent if path.parent.name == ckpt.CHECKPOINTS else path
    name = path.stem if path.is_file() else path.name
    return Engine(model, tokenizer, name, dev, limits)


def serve(source: str | Path, settings: ServeConfig | None = None, log=print) -> None:
    """Load the model in source and serve it until interrupted."""

    settings = settings or ServeConfig()
    host = settings.host
    hosts = AllowedHosts.serving(host, settings.allowed_host)
    sock = listen(host, settings.port)  # before loading, so a busy port fails fast
    engine = load_engine(source, settings.device, settings.limits, settings.tokenizer)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if host not in LOOPBACK:
        log(f"warning: listening on {host}, not loopback: anyone who can reach this machine can use the model")
    cfg, n, each = engine.model.cfg, engine.limits.max_concurrent, engine.cache_bytes()
    element = next(engine.model.parameters()).dtype.itemsize
    log(f"memory: each generation holds a {size(each)} KV cache (2 * {cfg.n_layers} layers * "
        f"{engine.cache_positions()} positions * {cfg.n_kv_heads} key/value heads * {cfg.head_dim} head_dim * "
        f"{element} bytes); at most {n} at once (--max-concurrent): {size(n * each)}")
    log(f"serving {engine.name} at http://{shown}:{bound}/  (API: POST http://{shown}:{bound}/v1/completions)")
    config = uvicorn.Config(make_app(engine, hosts), log_level="warning", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])

"""
Serve a trained model as a web chat (a ChatGPT-like page) and an OpenAI-compatible API.

    python -m scripts.chat_web -i sft                   # http://127.0.0.1:8000
    NANOCHAT_API_KEY=... python -m scripts.chat_web -i sft -n 8 --host 0.0.0.0   # one replica per GPU, key required
    python -m scripts.chat_web -i base                  # a base model: use /v1/completions

Endpoints:
    GET  /                      the chat page (nanochat/ui.html)
    POST /chat/completions      our stream: `data: {"token": "...", "gpu": 0}` lines, then `data: {"done": true}`
    POST /v1/chat/completions   OpenAI-compatible chat (stream: chat.completion.chunk events and `data: [DONE]`)
    POST /v1/completions        OpenAI-compatible legacy completions: the prompt's text is continued as given
                                (BOS + its tokens, no chat tokens, no calculator) -- how a base model is prompted
    GET  /v1/models, /health, /stats

Both OpenAI endpoints honour `stop` (up to 4 strings; the text ends before the first one, finish_reason "stop")
and answer a parameter they do not implement (logprobs, penalties, n > 1, unknown fields) with a 400 naming it,
rather than ignoring it. With an API key (--api-key or NANOCHAT_API_KEY), every route but the page and /health
needs `Authorization: Bearer <key>`, as OpenAI clients send it; without one, anyone who can reach the port can
use the model, so binding a non-loopback address without a key prints a warning.

Each model replica is a worker; requests wait in one FIFO queue for a free worker, generate in
a thread (the event loop never blocks on the model), and give the worker back as soon as the
answer is done, the client disconnects, or it presses stop.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import random
import re
import sys
import threading
import time
import uuid

from nanochat.common import ArgumentParser, NanochatError, resolve_device_type, run_main
from nanochat.engine import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPES, Engine, StreamDecoder

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# Request limits (answered with 4xx)
MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 16_000
MAX_TOTAL_CHARS = 64_000
MAX_QUEUED = 256            # requests waiting for a worker beyond this get 503
MIN_ANSWER_TOKENS = 16      # old turns are dropped until the prompt leaves at least this much room
MAX_STOPS = 4               # as OpenAI
MAX_STOP_CHARS = 256


# -----------------------------------------------------------------------------
# Workers: one model replica each, handed out through a FIFO queue

class Worker:
    def __init__(self, model, tokenizer, index=0, device="cpu", weights_dtype=None):
        self.engine = Engine(model, tokenizer, weights_dtype=weights_dtype)
        # plain continuation: nothing forced into it
        self.raw_engine = Engine(model, tokenizer, tools=False, weights_dtype=weights_dtype)
        self.tokenizer = tokenizer
        self.index = index
        self.device = str(device)
        self.busy = False
        self.requests = 0
        self.tokens = 0

    def stream(self, prompt, params, stop_event):
        """Generate in the calling thread; yields text pieces, then returns (finish_reason, n_tokens).
        params["raw"]: continue the prompt as plain text (no calculator, special tokens not shown)."""
        engine = self.raw_engine if params["raw"] else self.engine
        decoder = StreamDecoder(self.tokenizer, show_tool_calls=not params["raw"])
        cut = StopStrings(params["stop"])
        n, finish = 0, "length"
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=params["max_tokens"], seed=params["seed"],
                                         temperature=params["temperature"], top_k=params["top_k"] or None,
                                         top_p=params["top_p"]):
            token = column[0]
            if token in (engine.assistant_end, engine.bos):
                finish = "stop"
                break
            n += 1
            piece = cut.push(decoder.push(token))
            if piece:
                yield piece
            if cut.stopped or stop_event.is_set():
                finish = "stop"
                break
        if not cut.stopped:
            tail = cut.push(decoder.flush())
            tail += cut.flush()
            if cut.stopped:  # the decoder's last bytes completed a stop string
                finish = "stop"
            if tail:
                yield tail
        self.tokens += n
        return finish, n


class StopStrings:
    """Cuts a stream of text pieces before the first occurrence of any stop string. The last
    len(longest stop) - 1 characters are held back, as they may be the start of a stop that the
    next piece completes; so no text past a stop is ever emitted, and the emitted text is exactly
    the full text cut before its earliest stop."""

    def __init__(self, stops):
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, piece):
        """Text that is now safe to emit ("" once stopped)."""
        if self.stopped or not piece:
            return ""
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out
        keep = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:keep], self.buffer[keep:]
        return out

    def flush(self):
        """The held-back tail, at the end of the text (no stop can complete any more)."""
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class WorkerPool:
    def __init__(self, workers):
        if not workers:
            raise ValueError("the worker pool needs at least one worker")
        self.workers = list(workers)
        self.free = None  # asyncio.Queue, created inside the server's event loop
        self.waiting = 0
        self.served = 0
        self.started = time.time()

    def start(self):
        self.free = asyncio.Queue()
        for w in self.workers:
            self.free.put_nowait(w)

    async def acquire(self):
        if self.free is None:
            self.start()
        self.waiting += 1
        try:
            worker = await self.free.get()  # asyncio.Queue serves waiters first come, first served
        finally:
            self.waiting -= 1
        worker.busy = True
        worker.requests += 1
        return worker

    def release(self, worker):
        worker.busy = False
        self.served += 1
        self.free.put_nowait(worker)

    def available(self):
        return sum(not w.busy for w in self.workers)


# -----------------------------------------------------------------------------
# Request validation

class BadRequest(Exception):
    """A request refused with `status` (4xx, or 503 when busy): create_app answers it with an OpenAI-style error."""

    def __init__(self, message, status=400, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}", param=name)
    if (value <= lo if lo_open else value < lo) or value > hi:
        raise BadRequest(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", param=name)
    return int(value) if integer else float(value)


def _text_of(content, i):
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param="messages")


# The fields a request may carry. Those in DEFAULT_ONLY are accepted only at OpenAI's default: any
# other value asks for something we do not implement, so it is refused by name instead of ignored.
SAMPLING_FIELDS = {"model", "user", "stream", "temperature", "top_k", "top_p", "max_tokens", "seed", "stop"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}
DEFAULT_ONLY = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": None,
                "logit_bias": {}, "stream_options": None, "tools": [], "tool_choice": "none", "best_of": 1,
                "echo": False, "suffix": None}
CHAT_DEFAULT_ONLY = ("n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "logit_bias",
                     "stream_options", "tools", "tool_choice")
COMPLETION_DEFAULT_ONLY = ("n", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias", "stream_options",
                           "best_of", "echo", "suffix")


def _is_default(value, default):
    if value is None or (type(value) is type(default) and value == default):  # None always means "not set"
        return True
    # numbers compare by value (n=1.0, presence_penalty=0.0), but logprobs=0 is not logprobs=False
    number = (int, float)
    return (isinstance(default, number) and not isinstance(default, bool) and isinstance(value, number)
            and not isinstance(value, bool) and value == default)


def check_fields(body, allowed, default_only):
    """Refuse unknown fields and fields set to something other than their default, naming them all."""
    unknown = sorted(k for k in body if k not in allowed and k not in default_only)
    unsupported = [k for k in default_only if not _is_default(body.get(k), DEFAULT_ONLY[k])]
    if unknown or unsupported:  # names, values and the list shortened: a hostile body can be huge
        names = ([f"{k}={json.dumps(body[k])[:40]}" for k in unsupported] + [k[:40] for k in unknown])[:8]
        raise BadRequest(f"unsupported parameter{'s' if len(names) > 1 else ''}: {', '.join(names)} "
                         f"(this server does not implement {'them' if len(names) > 1 else 'it'})",
                         param=(unsupported + unknown)[0][:40])


def _stops(body):
    """`stop`: null, a string or a list of up to MAX_STOPS strings -> a list of non-empty strings."""
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise BadRequest("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS or any(len(x) > MAX_STOP_CHARS for x in stops):
        raise BadRequest(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters", param="stop")
    return [x for x in stops if x]


def sampling_params(body, defaults, max_tokens, raw):
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", param="seed")
    return {
        "temperature": _number(body, "temperature", defaults["temperature"], 0.0, 2.0),
        "top_k": _number(body, "top_k", defaults["top_k"], 0, 200, integer=True),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", defaults["max_tokens"], 1, 4096, integer=True),
        "seed": random.randrange(2**31) if seed is None else seed,
        "stream": bool(body.get("stream", False)),
        "stop": _stops(body),
        "raw": raw,
    }


def parse_chat_request(body, defaults):
    """A chat request's JSON body -> (messages, params); BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_fields(body, CHAT_FIELDS, CHAT_DEFAULT_ONLY)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"too many messages ({len(messages)} > {MAX_MESSAGES})", status=413, param="messages")
    clean, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object with role system, user or assistant", param="messages")
        text = _text_of(m.get("content"), i)
        if len(text) > MAX_MESSAGE_CHARS:
            raise BadRequest(f"messages[{i}] is {len(text)} characters (limit {MAX_MESSAGE_CHARS})",
                             status=413, param="messages")
        total += len(text)
        clean.append({"role": m["role"], "content": text})
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"the messages total {total} characters (limit {MAX_TOTAL_CHARS})",
                         status=413, param="messages")
    if clean[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return clean, sampling_params(body, defaults, max_tokens, raw=False)


def parse_completion_request(body, defaults, tokenizer, window):
    """A legacy completion request's JSON body -> (prompt ids, params). The prompt is one text
    (BOS + its tokens, nothing else) or one list of token ids (used as given)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_fields(body, COMPLETION_FIELDS, COMPLETION_DEFAULT_ONLY)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if len(prompt) > MAX_TOTAL_CHARS:
            raise BadRequest(f"the prompt is {len(prompt)} characters (limit {MAX_TOTAL_CHARS})",
                             status=413, param="prompt")
        ids = [tokenizer.get_bos_token_id()] + tokenizer.encode(prompt)
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        vocab = tokenizer.get_vocab_size()
        if not all(0 <= t < vocab for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = list(prompt)
    else:
        raise BadRequest("prompt must be a string or a non-empty list of token ids (one prompt per request)",
                         param="prompt")
    if len(ids) >= window:
        raise BadRequest(f"the prompt is {len(ids)} tokens; this model's context window is {window}",
                         status=413, param="prompt")
    return ids, sampling_params(body, defaults, body.get("max_tokens"), raw=True)


def render_prompt(tokenizer, messages, window):
    """Conversation -> prompt ids ending in <|assistant_start|>; the oldest turns are dropped
    until the prompt leaves room for an answer in the model's context window."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        try:
            ids = tokenizer.render_for_completion({"messages": system + turns + [{"role": "assistant", "content": ""}]})
        except ValueError as e:
            raise BadRequest(f"invalid conversation: {e}", param="messages") from None
        if len(ids) + MIN_ANSWER_TOKENS <= window:
            return ids
        if len(turns) <= 1:
            raise BadRequest(f"the last message is too long for this model's {window}-token context window",
                             status=413, param="messages")
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]


# -----------------------------------------------------------------------------
# The app

def create_app(workers, model_name="nanochat", temperature=0.8, top_k=50, max_tokens=512, api_key=None):
    """A FastAPI app serving `workers` (a list of Worker: one model replica each). Tests build it
    around a tiny random model; main() builds it from checkpoints. With `api_key`, every route but
    the page and /health needs `Authorization: Bearer <api_key>`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    pool = WorkerPool(workers)
    defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
    tokenizer = workers[0].tokenizer
    window = workers[0].engine.model.config.sequence_len
    created = int(time.time())
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)
    app.state.pool = pool

    def error(status, message, param=None, code=None, headers=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status, headers=headers)

    @app.exception_handler(BadRequest)
    async def refused(request, e):  # every route: a refused request gets its error response
        return error(e.status, str(e), e.param, e.code, e.headers)

    # --- access control: compare digests, so the time taken says nothing about the key
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def check_key(request):
        """Raises BadRequest (401) unless the request carries the API key, if there is one (never echoed)."""
        if key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token.strip():
            raise BadRequest("this server needs an API key: send the header 'Authorization: Bearer <key>'",
                             status=401, code="missing_api_key", headers=challenge)
        if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), key_digest):
            raise BadRequest("incorrect API key", status=401, code="invalid_api_key", headers=challenge)

    async def read_body(request):
        """The request's JSON body, or raises BadRequest."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"request body too large (limit {MAX_BODY_BYTES} bytes)", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"request body too large (limit {MAX_BODY_BYTES} bytes)", status=413)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON: {e}") from None

    def check_queue():
        if pool.waiting >= MAX_QUEUED:
            raise BadRequest("the server is busy; try again shortly", status=503)

    async def read_chat_request(request):
        """A chat request's (params, prompt ids), or raises BadRequest."""
        messages, params = parse_chat_request(await read_body(request), defaults)
        prompt = render_prompt(tokenizer, messages, window)
        check_queue()
        return params, prompt

    async def generate(request, prompt, params, info, stop_event):
        """Async generator of text pieces from a free worker; fills info (worker, finish, tokens).
        Generation runs in a thread; the worker is released by that thread when it ends, and it
        ends soon after the client goes away or stops (stop_event, set by the caller too)."""
        worker = await pool.acquire()
        info["worker"] = worker.index
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        def work():
            try:
                stream = worker.stream(prompt, params, stop_event)
                while True:
                    try:
                        put(("piece", next(stream)))
                    except StopIteration as done:
                        put(("done", done.value))
                        break
            except Exception as e:  # reported to the client; the server stays up
                put(("error", f"{e.__class__.__name__}: {e}"))
            finally:
                try:
                    loop.call_soon_threadsafe(pool.release, worker)
                except RuntimeError:
                    pass

        threading.Thread(target=work, name=f"generate-{worker.index}", daemon=True).start()
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "piece":
                    yield value
                elif kind == "done":
                    info["finish"], info["tokens"] = value
                    return
                else:
                    info["error"] = value
                    return
        finally:
            stop_event.set()  # client gone, stop pressed, or done: the thread stops and frees the worker

    async def collect(request, prompt, params):
        """The whole answer at once: (info, text)."""
        info, pieces, stop_event = {}, [], threading.Event()
        try:
            async for piece in generate(request, prompt, params, info, stop_event):
                pieces.append(piece)
        finally:
            stop_event.set()
        return info, "".join(pieces)

    def usage(prompt, info):
        n = info.get("tokens", 0)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_response(events):
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def openai_stream(request, prompt, params, piece_event, finish_event, first=()):
        """The OpenAI streaming answer: the `first` events, an event per text piece, the one with the finish reason
        and `[DONE]`; a generation error ends it with an error event instead."""
        async def events():
            info, stop_event = {}, threading.Event()
            try:
                for event in first:
                    yield event
                async for piece in generate(request, prompt, params, info, stop_event):
                    yield piece_event(piece)
                if "error" in info:
                    yield sse({"error": {"message": info["error"], "type": "server_error"}})
                    return
                yield finish_event(info.get("finish", "stop"))
                yield "data: [DONE]\n\n"
            finally:
                stop_event.set()

        return sse_response(events())

    # --- routes

    with open(UI_PATH, "r", encoding="utf-8") as f:  # the page's settings start at the server's defaults
        page = (f.read().replace("__TEMPERATURE__", f"{temperature:g}").replace("__TOP_K__", str(top_k))
                .replace("__MAX_TOKENS__", str(max_tokens)))

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(pool.workers), "available": pool.available(), "queued": pool.waiting}

    @app.get("/stats")
    async def stats(request: Request):
        check_key(request)
        return {"uptime_s": round(time.time() - pool.started, 1), "requests_served": pool.served,
                "queued": pool.waiting,
                "workers": [{"index": w.index, "device": w.device, "busy": w.busy, "requests": w.requests,
                             "tokens": w.tokens} for w in pool.workers]}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        check_key(request)
        params, prompt = await read_chat_request(request)

        async def events():
            info, stop_event = {}, threading.Event()
            try:
                async for piece in generate(request, prompt, params, info, stop_event):
                    yield sse({"token": piece, "gpu": info["worker"]})
                yield sse({"error": info["error"]} if "error" in info else {"done": True})
            finally:
                stop_event.set()

        return sse_response(events())

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        check_key(request)
        params, prompt = await read_chat_request(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())

        if not params["stream"]:
            info, text = await collect(request, prompt, params)
            if "error" in info:
                return error(500, info["error"])
            return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": info.get("finish", "stop")}],
                    "usage": usage(prompt, info)}

        def chunk(delta, finish=None):
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        return openai_stream(request, prompt, params, lambda piece: chunk({"content": piece}),
                             lambda finish: chunk({}, finish), first=[chunk({"role": "assistant", "content": ""})])

    @app.post("/v1/completions")
    async def openai_completions(request: Request):
        check_key(request)
        prompt, params = parse_completion_request(await read_body(request), defaults, tokenizer, window)
        check_queue()
        completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())

        def completion(text, finish, **extra):
            return {"id": completion_id, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}

        if not params["stream"]:
            info, text = await collect(request, prompt, params)
            if "error" in info:
                return error(500, info["error"])
            return completion(text, info.get("finish", "stop"), usage=usage(prompt, info))

        return openai_stream(request, prompt, params, lambda piece: sse(completion(piece, None)),
                             lambda finish: sse(completion("", finish)))

    return app


# -----------------------------------------------------------------------------
# Main: load one replica per device and serve

def resolve_api_key(flag):
    """--api-key, else $NANOCHAT_API_KEY, else None (no access control). A key must be sendable
    as a header value: printable ASCII without spaces."""
    if flag == "":  # e.g. --api-key "$UNSET": serving without the key the user meant to set would be worse
        raise NanochatError("--api-key is empty; give the key, or leave the flag out to serve without one")
    key = flag if flag is not None else os.environ.get("NANOCHAT_API_KEY") or None
    if key is not None and not re.fullmatch(r"[!-~]+", key):
        raise NanochatError("the API key must be printable ASCII without spaces (e.g. from `openssl rand -hex 24`)")
    return key


def exposure_warning(host, api_key):
    """A loud warning when a non-loopback address is bound without an API key, else None."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    bar = "!" * 100
    return (f"{bar}\nWARNING: serving on {host} without an API key: anyone who can reach this port can use the model.\n"
            f"Set NANOCHAT_API_KEY=<secret> (or --api-key) to require 'Authorization: Bearer <secret>'.\n{bar}")


def main(argv=None):
    parser = ArgumentParser(description="Serve a nanochat checkpoint as a web chat and an OpenAI-compatible API.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which stage's checkpoint (base: prompt it through /v1/completions)")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU/MPS: 1)")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default longest answer, in tokens")
    parser.add_argument("--device", default="", help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--weights-dtype", default="model", choices=list(WEIGHTS_DTYPES), help=WEIGHTS_DTYPE_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on the API (default: $NANOCHAT_API_KEY; "
                             "prefer the variable: a flag is visible to other users in `ps`)")
    args = parser.parse_args(argv)
    api_key = resolve_api_key(args.api_key)

    # --- load the replicas
    import torch
    import uvicorn
    from nanochat.checkpoint_manager import checkpoints_root, find_latest_tag, load_model
    device_type = resolve_device_type(args.device)
    if args.num_gpus < 1:
        raise NanochatError(f"-n {args.num_gpus}: need at least one replica")
    if device_type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            raise NanochatError(f"-n {args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible; lower -n")
        devices = [f"cuda:{i}" for i in range(args.num_gpus)]
    else:
        if args.num_gpus > 1:
            print(f"-n {args.num_gpus} ignored on {device_type}: serving one replica", flush=True)
        devices = [device_type]
    workers, meta, weights_dtype = [], None, WEIGHTS_DTYPES[args.weights_dtype]
    for i, device in enumerate(devices):
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        workers.append(Worker(model, tokenizer, index=i, device=device, weights_dtype=weights_dtype))
    tag = args.model_tag or find_latest_tag(checkpoints_root(args.source))
    model_name = f"nanochat-{args.source}-{tag}-step{meta.get('step')}"

    # --- serve
    app = create_app(workers, model_name=model_name, temperature=args.temperature, top_k=args.top_k,
                     max_tokens=args.max_tokens, api_key=api_key)
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"serving {model_name} on {len(workers)} worker(s) at http://{args.host}:{args.port}"
          f"{' (API key required)' if api_key else ''}"
          f"{f', decoding with {args.weights_dtype} weights' if args.weights_dtype != 'model' else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_main(main)

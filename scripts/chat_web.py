"""
Serve a trained model as a web chat (a ChatGPT-like page) and an OpenAI-compatible API.

    python -m scripts.chat_web -i sft                   # http://127.0.0.1:8000
    python -m scripts.chat_web -i sft -n 8 --host 0.0.0.0 --port 8000   # one replica per GPU

Endpoints:
    GET  /                      the chat page (nanochat/ui.html)
    POST /chat/completions      our stream: `data: {"token": "...", "gpu": 0}` lines, then `data: {"done": true}`
    POST /v1/chat/completions   OpenAI-compatible (stream: chat.completion.chunk events and `data: [DONE]`)
    GET  /v1/models, /health, /stats

Each model replica is a worker; requests wait in one FIFO queue for a free worker, generate in
a thread (the event loop never blocks on the model), and give the worker back as soon as the
answer is done, the client disconnects, or it presses stop.
"""

import asyncio
import json
import os
import random
import threading
import time
import uuid

from nanochat.common import ArgumentParser, NanochatError, resolve_device_type, run_main
from nanochat.engine import Engine, StreamDecoder

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# Request limits (answered with 4xx)
MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 16_000
MAX_TOTAL_CHARS = 64_000
MAX_QUEUED = 256            # requests waiting for a worker beyond this get 503
MIN_ANSWER_TOKENS = 16      # old turns are dropped until the prompt leaves at least this much room


# -----------------------------------------------------------------------------
# Workers: one model replica each, handed out through a FIFO queue

class Worker:
    def __init__(self, model, tokenizer, index=0, device="cpu"):
        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.index = index
        self.device = str(device)
        self.busy = False
        self.requests = 0
        self.tokens = 0

    def stream(self, prompt, params, stop_event):
        """Generate in the calling thread; yields text pieces, then returns (finish_reason, n_tokens)."""
        engine = self.engine
        decoder = StreamDecoder(self.tokenizer)
        n, finish = 0, "length"
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=params["max_tokens"], seed=params["seed"],
                                         temperature=params["temperature"], top_k=params["top_k"] or None,
                                         top_p=params["top_p"]):
            token = column[0]
            if token in (engine.assistant_end, engine.bos):
                finish = "stop"
                break
            n += 1
            piece = decoder.push(token)
            if piece:
                yield piece
            if stop_event.is_set():
                finish = "stop"
                break
        tail = decoder.flush()
        if tail:
            yield tail
        self.tokens += n
        return finish, n


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
    def __init__(self, message, status=400, param=None):
        super().__init__(message)
        self.status, self.param = status, param


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
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_request(body, defaults):
    """A JSON body -> (messages, params); BadRequest says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
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
            raise BadRequest(f"messages[{i}] is {len(text)} characters (limit {MAX_MESSAGE_CHARS})", status=413, param="messages")
        total += len(text)
        clean.append({"role": m["role"], "content": text})
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"the messages total {total} characters (limit {MAX_TOTAL_CHARS})", status=413, param="messages")
    if clean[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed must be an integer", param="seed")
    params = {
        "temperature": _number(body, "temperature", defaults["temperature"], 0.0, 2.0),
        "top_k": _number(body, "top_k", defaults["top_k"], 0, 200, integer=True),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", defaults["max_tokens"], 1, 4096, integer=True),
        "seed": random.randrange(2**31) if seed is None else seed,
        "stream": bool(body.get("stream", False)),
    }
    return clean, params


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

def create_app(workers, model_name="nanochat", temperature=0.8, top_k=50, max_tokens=512):
    """A FastAPI app serving `workers` (a list of Worker: one model replica each). Tests build it
    around a tiny random model; main() builds it from checkpoints."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    pool = WorkerPool(workers)
    defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
    tokenizer = workers[0].tokenizer
    window = workers[0].engine.model.config.sequence_len
    created = int(time.time())
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None)
    app.state.pool = pool

    def error(status, message, param=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)

    async def read_request(request):
        """The request's (messages, params, prompt ids), or raises BadRequest."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"request body too large (limit {MAX_BODY_BYTES} bytes)", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"request body too large (limit {MAX_BODY_BYTES} bytes)", status=413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON: {e}") from None
        messages, params = parse_request(body, defaults)
        prompt = render_prompt(tokenizer, messages, window)
        if pool.waiting >= MAX_QUEUED:
            raise BadRequest("the server is busy; try again shortly", status=503)
        return messages, params, prompt

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

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

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
    async def stats():
        return {"uptime_s": round(time.time() - pool.started, 1), "requests_served": pool.served, "queued": pool.waiting,
                "workers": [{"index": w.index, "device": w.device, "busy": w.busy, "requests": w.requests,
                             "tokens": w.tokens} for w in pool.workers]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        try:
            _, params, prompt = await read_request(request)
        except BadRequest as e:
            return error(e.status, str(e), e.param)

        async def events():
            info, stop_event = {}, threading.Event()
            try:
                async for piece in generate(request, prompt, params, info, stop_event):
                    yield sse({"token": piece, "gpu": info["worker"]})
                yield sse({"error": info["error"]} if "error" in info else {"done": True})
            finally:
                stop_event.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers)

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        try:
            _, params, prompt = await read_request(request)
        except BadRequest as e:
            return error(e.status, str(e), e.param)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())

        def usage(info):
            n = info.get("tokens", 0)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if not params["stream"]:
            info, pieces, stop_event = {}, [], threading.Event()
            try:
                async for piece in generate(request, prompt, params, info, stop_event):
                    pieces.append(piece)
            finally:
                stop_event.set()
            if "error" in info:
                return error(500, info["error"])
            return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "finish_reason": info.get("finish", "stop")}],
                    "usage": usage(info)}

        def chunk(delta, finish=None):
            return sse({"id": completion_id, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events():
            info, stop_event = {}, threading.Event()
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece in generate(request, prompt, params, info, stop_event):
                    yield chunk({"content": piece})
                if "error" in info:
                    yield sse({"error": {"message": info["error"], "type": "server_error"}})
                    return
                yield chunk({}, info.get("finish", "stop"))
                yield "data: [DONE]\n\n"
            finally:
                stop_event.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers)

    return app


# -----------------------------------------------------------------------------
# Main: load one replica per device and serve

def main(argv=None):
    parser = ArgumentParser(description="Serve a nanochat checkpoint as a web chat and an OpenAI-compatible API.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU/MPS: 1)")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default longest answer, in tokens")
    parser.add_argument("--device", default="", help="cuda | mps | cpu (default: autodetect)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

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
    workers, meta = [], None
    for i, device in enumerate(devices):
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        workers.append(Worker(model, tokenizer, index=i, device=device))
    tag = args.model_tag or find_latest_tag(checkpoints_root(args.source))
    model_name = f"nanochat-{args.source}-{tag}-step{meta.get('step')}"

    # --- serve
    app = create_app(workers, model_name=model_name, temperature=args.temperature, top_k=args.top_k,
                     max_tokens=args.max_tokens)
    print(f"serving {model_name} on {len(workers)} worker(s) at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_main(main)

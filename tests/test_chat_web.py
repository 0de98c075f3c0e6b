"""
scripts.chat_web's server, against a tiny random model on 127.0.0.1: the official openai client
works (stream and not), our SSE stream is well-formed, bad input gets a 4xx with a JSON error
and leaves the server up, 32 concurrent clients are all answered, and a client that disconnects
frees its worker at once. /v1/completions continues a prompt exactly as GPT.generate does, `stop`
cuts the text (streamed or not), parameters we do not implement are refused by name, and with an
API key only `Authorization: Bearer <key>` gets in.
"""

import concurrent.futures
import http.client
import itertools
import json
import time
import urllib.parse

import openai
import pytest
import torch

import scripts.chat_web as chat_web
from nanochat.common import NanochatError
from nanochat.engine import Engine, StreamDecoder
from scripts.chat_web import MAX_MESSAGE_CHARS, MAX_MESSAGES, StopStrings, Worker, create_app
from tests.helpers_chat import (ChatServer, SuccessorModel, long_talker, successor_chain, tiny_model,
                                tiny_tokenizer)

MODEL_NAME = "nanochat-test"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    # two replicas of one model: the pool hands requests to whichever is free
    model = tiny_model(tokenizer)
    app = create_app([Worker(model, tokenizer, index=0), Worker(model, tokenizer, index=1)], model_name=MODEL_NAME)
    with ChatServer(app) as s:
        s.model = model
        yield s


def expected_text(model, tokenizer, user_text, max_tokens, **engine_options):
    """The greedy answer, decoded the way the server streams it."""
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": user_text},
                                                           {"role": "assistant", "content": ""}]})
    results, _ = Engine(model, tokenizer, **engine_options).generate_batch(prompt, max_tokens=max_tokens,
                                                                            temperature=0.0)
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(t) for t in results[0][len(prompt):]) + decoder.flush(), len(prompt)


def request(url, method, path, body=None, raw=None, timeout=60, headers=None, full=False):
    """(status, parsed JSON or text) over http.client; full=True adds the response headers."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = text
    return (resp.status, parsed, dict(resp.getheaders())) if full else (resp.status, parsed)


def sse_events(text):
    return [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]


# -----------------------------------------------------------------------------
# API shape

def test_openai_client_gets_the_same_answer_streamed_and_not(server, tokenizer):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    messages = [{"role": "user", "content": "the quick fox?"}]
    want, prompt_len = expected_text(server.model, tokenizer, "the quick fox?", 24)
    assert want  # a non-empty answer, so the comparisons below mean something

    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=24)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_len
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == prompt_len + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=24,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_openai_stream_ends_with_done_marker(server):
    status, text = request(server.url, "POST", "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8})
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_our_stream_sends_tokens_then_done(server, tokenizer):
    want, _ = expected_text(server.model, tokenizer, "lazy dog", 20)
    status, text = request(server.url, "POST", "/chat/completions",
                           {"messages": [{"role": "user", "content": "lazy dog"}], "temperature": 0, "max_tokens": 20})
    assert status == 200
    events = [json.loads(e) for e in sse_events(text)]
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] in (0, 1) for e in events[:-1])
    assert "".join(e["token"] for e in events[:-1]) == want


def test_page_health_and_stats_endpoints(server):
    status, page = request(server.url, "GET", "/")
    assert status == 200 and "<title>nanochat</title>" in page and "/chat/completions" in page
    assert 'id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"' in page  # the server's default
    status, health = request(server.url, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["workers"] == 2
    status, stats = request(server.url, "GET", "/stats")
    assert status == 200 and [w["index"] for w in stats["workers"]] == [0, 1]


# -----------------------------------------------------------------------------
# Bad input

def user(text):
    return [{"role": "user", "content": text}]


BAD_REQUESTS = [
    ("malformed JSON", b'{"messages": [', 400),
    ("not an object", b'[1, 2]', 400),
    ("no messages", json.dumps({"messages": []}).encode(), 400),
    ("too many messages", json.dumps({"messages": user("a") * (MAX_MESSAGES + 1)}).encode(), 413),
    ("message too long", json.dumps({"messages": user("a" * (MAX_MESSAGE_CHARS + 1))}).encode(), 413),
    ("total too long", json.dumps({"messages": [{"role": r, "content": "a" * MAX_MESSAGE_CHARS}
                                                for r in ["user", "assistant"] * 3] + user("a")}).encode(), 413),
    ("unknown role", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400),
    ("last message not the user's",
     json.dumps({"messages": user("a") + [{"role": "assistant", "content": "b"}]}).encode(), 400),
    ("roles do not alternate", json.dumps({"messages": user("a") + user("b")}).encode(), 400),
    ("temperature too high", json.dumps({"messages": user("a"), "temperature": 2.5}).encode(), 400),
    ("temperature negative", json.dumps({"messages": user("a"), "temperature": -0.1}).encode(), 400),
    ("temperature not a number", json.dumps({"messages": user("a"), "temperature": "hot"}).encode(), 400),
    ("top_k too high", json.dumps({"messages": user("a"), "top_k": 201}).encode(), 400),
    ("top_k not an integer", json.dumps({"messages": user("a"), "top_k": 1.5}).encode(), 400),
    ("top_p zero", json.dumps({"messages": user("a"), "top_p": 0}).encode(), 400),
    ("top_p above one", json.dumps({"messages": user("a"), "top_p": 1.01}).encode(), 400),
    ("max_tokens zero", json.dumps({"messages": user("a"), "max_tokens": 0}).encode(), 400),
    ("max_tokens too many", json.dumps({"messages": user("a"), "max_tokens": 4097}).encode(), 400),
    ("n > 1", json.dumps({"messages": user("a"), "n": 2}).encode(), 400),
    ("unknown field", json.dumps({"messages": user("a"), "mirostat": 2}).encode(), 400),
    ("logprobs", json.dumps({"messages": user("a"), "logprobs": True}).encode(), 400),
    ("stop not a string", json.dumps({"messages": user("a"), "stop": [1]}).encode(), 400),
    ("too many stops", json.dumps({"messages": user("a"), "stop": list("abcde")}).encode(), 400),
    ("body too large", json.dumps({"messages": user("a" * 1_100_000)}).encode(), 413),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_bad_requests_get_a_4xx_json_error_and_the_server_stays_up(server, path):
    for name, raw, status in BAD_REQUESTS:
        got, body = request(server.url, "POST", path, raw=raw)
        assert got == status, (name, got, body)
        assert isinstance(body, dict) and body["error"]["message"], name
    status, health = request(server.url, "GET", "/health")
    assert status == 200 and health["available"] == 2
    status, _ = request(server.url, "POST", path, {"messages": user("still here?"), "max_tokens": 4})
    assert status == 200


def test_a_conversation_longer_than_the_window_drops_old_turns_instead_of_failing(server):
    long_turns = []
    for i in range(6):  # ~6 x 120 characters: far more than the 256-token window of the tiny model
        long_turns += [{"role": "user", "content": f"{i} " + "the quick brown fox " * 6},
                       {"role": "assistant", "content": "the lazy dog " * 8}]
    status, body = request(server.url, "POST", "/v1/chat/completions", {"messages": long_turns + user("and now?"),
                                                                        "max_tokens": 8})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] + 16 <= 256


# -----------------------------------------------------------------------------
# Load and disconnects

def wait_until_idle(url, timeout=30):
    """Until every worker is free: a request of an earlier test (a stream its client left) may still be
    finishing, and it would count as served after a snapshot taken now."""
    deadline = time.time() + timeout
    while True:
        _, health = request(url, "GET", "/health")
        if health["available"] == health["workers"] and health["queued"] == 0 or time.time() > deadline:
            return
        time.sleep(0.05)


def test_32_concurrent_clients_are_all_answered_and_the_server_is_healthy_after(server):
    wait_until_idle(server.url)
    _, before = request(server.url, "GET", "/stats")

    def client(i):
        stream = i % 2 == 0
        status, body = request(server.url, "POST", "/v1/chat/completions",
                               {"messages": user(f"client {i}"), "max_tokens": 12, "seed": i, "stream": stream})
        if status != 200:
            return False
        if stream:
            return sse_events(body)[-1] == "[DONE]"
        return body["choices"][0]["finish_reason"] in ("stop", "length")

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answered = list(pool.map(client, range(32)))
    assert all(answered), answered.count(False)
    assert time.time() - t0 < 120
    status, health = request(server.url, "GET", "/health")
    assert status == 200 and health == {"status": "ok", "workers": 2, "available": 2, "queued": 0}
    _, after = request(server.url, "GET", "/stats")
    assert after["requests_served"] - before["requests_served"] == 32
    assert all(w["requests"] > 0 for w in after["workers"])  # both replicas took work


@pytest.fixture(scope="module")
def slow_talker(tokenizer):
    """A model whose greedy answer to "the quick brown fox" is >= 300 tokens, at >= 10 ms a token."""
    prompt = tokenizer.render_for_completion({"messages": user("the quick brown fox")
                                              + [{"role": "assistant", "content": ""}]})
    model = long_talker(tokenizer, prompt, 300)
    forward = model.forward
    model.forward = lambda *a, **k: (time.sleep(0.01), forward(*a, **k))[1]
    return model


def test_a_client_that_stops_reading_does_not_hold_the_worker(tokenizer, slow_talker):
    with ChatServer(create_app([Worker(slow_talker, tokenizer)], model_name=MODEL_NAME)) as server:
        u = urllib.parse.urlparse(server.url)
        stalled = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        stalled.request("POST", "/chat/completions", body=json.dumps({"messages": user("the quick brown fox"),
                                                                       "temperature": 0, "max_tokens": 300}),
                        headers={"Content-Type": "application/json"})
        t0 = time.time()  # ...and never reads the answer; the next user is served once it is generated
        while request(server.url, "GET", "/health")[1]["available"] != 0:  # the stalled request has the worker
            assert time.time() - t0 < 30
            time.sleep(0.01)
        status, body = request(server.url, "POST", "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 4})
        assert status == 200 and body["choices"][0]["message"]["content"] is not None
        assert time.time() - t0 < 60
        _, stats = request(server.url, "GET", "/stats")
        assert stats["workers"][0]["requests"] == 2 and stats["workers"][0]["tokens"] >= 300
        stalled.close()


def test_a_client_that_disconnects_mid_stream_frees_its_worker(tokenizer, slow_talker):
    prompt_text = "the quick brown fox"
    app = create_app([Worker(slow_talker, tokenizer)], model_name=MODEL_NAME)
    with ChatServer(app) as server:
        u = urllib.parse.urlparse(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", "/chat/completions", body=json.dumps({"messages": user(prompt_text), "temperature": 0,
                                                                    "max_tokens": 300}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")  # the answer is streaming
        conn.sock.shutdown(2)  # the user closes the tab
        conn.close()
        t0 = time.time()
        while request(server.url, "GET", "/health")[1]["available"] != 1:
            assert time.time() - t0 < 10, "the worker was not released after the client left"
            time.sleep(0.02)
        _, stats = request(server.url, "GET", "/stats")
        assert stats["workers"][0]["tokens"] < 300  # generation stopped early, it did not run to the end
        status, _ = request(server.url, "POST", "/chat/completions", {"messages": user("next"), "max_tokens": 4})
        assert status == 200


# -----------------------------------------------------------------------------
# Raw completion: a base model continues the text as given

def greedy_continuation(model, tokenizer, text, max_tokens):
    """(prompt ids, generated ids): GPT.generate's greedy ids after BOS + text (the naive reference,
    no KV cache), up to the first id that ends a text."""
    bos = tokenizer.get_bos_token_id()
    prompt = [bos] + tokenizer.encode(text)
    ends = {bos, tokenizer.encode_special("<|assistant_end|>")}
    ids = list(itertools.takewhile(lambda t: t not in ends, model.generate(prompt, max_tokens, temperature=0.0)))
    specials = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    assert ids and specials.isdisjoint(ids)  # plain text, so comparing decoded text compares every id
    return prompt, ids


def openai_client(server, api_key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)


def test_completions_continue_a_prompt_exactly_as_gpt_generate_does_greedily(server, tokenizer):
    prompt, ids = greedy_continuation(server.model, tokenizer, "the cat", 24)
    want = tokenizer.decode(ids)
    client = openai_client(server)
    reply = client.completions.create(model=MODEL_NAME, prompt="the cat", temperature=0, max_tokens=24)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == want
    assert reply.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
    assert reply.usage.prompt_tokens == len(prompt)  # BOS + the text's tokens: no chat tokens around it
    assert reply.usage.completion_tokens == len(ids)

    by_ids = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=24)
    assert by_ids.choices[0].text == want  # the same prompt given as token ids

    chunks = list(client.completions.create(model=MODEL_NAME, prompt="the cat", temperature=0, max_tokens=24,
                                            stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    chat = client.chat.completions.create(model=MODEL_NAME, messages=user("the cat"), temperature=0, max_tokens=24)
    assert chat.choices[0].message.content != want  # the chat endpoint does wrap the text in chat tokens


def test_a_worker_with_bf16_weights_answers_as_a_bf16_engine_does(tokenizer):
    model = tiny_model(tokenizer)
    worker = Worker(model, tokenizer, weights_dtype=torch.bfloat16)
    assert worker.engine.fast.dtype == worker.raw_engine.fast.dtype == torch.bfloat16
    with ChatServer(create_app([worker], model_name=MODEL_NAME)) as server:
        chat = openai_client(server).chat.completions.create(model=MODEL_NAME, messages=user("the cat"),
                                                             temperature=0, max_tokens=16)
    want, _ = expected_text(model, tokenizer, "the cat", 16, weights_dtype=torch.bfloat16)
    assert chat.choices[0].message.content == want


def test_completions_never_run_the_calculator(tokenizer):
    # a model that writes <|python_start|>6*7<|python_end|> ok<|assistant_end|> after BOS or <|assistant_start|>
    sp = tokenizer.encode_special
    script = [sp("<|bos|>"), sp("<|python_start|>")] + tokenizer.encode("6*7") + [sp("<|python_end|>")] \
        + tokenizer.encode(" ok") + [sp("<|assistant_end|>")]
    successor = {**successor_chain(script), sp("<|assistant_start|>"): sp("<|python_start|>"),
                 sp("<|output_end|>"): tokenizer.encode(" ")[0]}
    model = SuccessorModel(tokenizer, successor)
    with ChatServer(create_app([Worker(model, tokenizer)], model_name=MODEL_NAME)) as server:
        client = openai_client(server)
        chat = client.chat.completions.create(model=MODEL_NAME, messages=user("x"), temperature=0, max_tokens=30)
        assert chat.choices[0].message.content == "«6*7 → 42» ok"  # a chat turn does use the tool
        raw = client.completions.create(model=MODEL_NAME, prompt="", temperature=0, max_tokens=30)
        assert raw.choices[0].text == "6*7 ok"  # plain continuation: nothing forced in, specials not shown
        assert raw.choices[0].finish_reason == "stop" and raw.usage.completion_tokens == len(script) - 2


BAD_COMPLETIONS = [
    ("no prompt", {"max_tokens": 2}, 400),
    ("two prompts", {"prompt": ["a", "b"]}, 400),
    ("token id outside the vocab", {"prompt": [1, 10**6]}, 400),
    ("a prompt as long as the window", {"prompt": "a" * 300}, 413),
    ("messages instead of a prompt", {"prompt": "a", "messages": user("a")}, 400),
    ("echo", {"prompt": "a", "echo": True}, 400),
    ("stop not a string", {"prompt": "a", "stop": {"x": 1}}, 400),
]


def test_bad_completion_requests_get_a_4xx_naming_the_problem(server):
    for name, body, status in BAD_COMPLETIONS:
        got, reply = request(server.url, "POST", "/v1/completions", body)
        assert got == status, (name, got, reply)
        assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"], name
    hostile = {"prompt": "a", "logit_bias": {str(i): 1 for i in range(5000)}, **{f"x{i}" * 50: 1 for i in range(2000)}}
    got, reply = request(server.url, "POST", "/v1/completions", hostile)
    assert got == 400 and reply["error"]["param"] == "logit_bias" and len(reply["error"]["message"]) < 1000
    status, reply = request(server.url, "POST", "/v1/completions", {"prompt": "still here", "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2


# -----------------------------------------------------------------------------
# stop

def test_stop_strings_never_let_text_past_a_stop_whatever_the_pieces():
    text = "abcabd--xyz"
    for stops in (["abd"], ["--", "c"], ["zz"], ["ab", "b"], ["yz", "d--x"]):
        hits = [text.find(s) for s in stops if s in text]
        want = text[:min(hits)] if hits else text
        for cuts in itertools.combinations(range(1, len(text)), 3):  # every way to split it into 4 pieces
            bounds = (0,) + cuts + (len(text),)
            f = StopStrings(stops)
            emitted = "".join(f.push(text[i:j]) for i, j in zip(bounds, bounds[1:])) + f.flush()
            assert emitted == want, (stops, cuts)
            assert f.stopped == bool(hits)


def answer(client, kind, stream, **kwargs):
    """(text, finish_reason) from the chat or the completions endpoint, streamed or not."""
    if kind == "chat":
        create = lambda **kw: client.chat.completions.create(model=MODEL_NAME, messages=user("the dog"), **kw)
        text_of = (lambda c: c.delta.content or "") if stream else (lambda c: c.message.content)
    else:
        create = lambda **kw: client.completions.create(model=MODEL_NAME, prompt="the dog", **kw)
        text_of = lambda c: c.text
    if stream:
        chunks = list(create(stream=True, temperature=0, **kwargs))
        return "".join(text_of(c.choices[0]) for c in chunks if c.choices), chunks[-1].choices[0].finish_reason
    reply = create(temperature=0, **kwargs)
    return text_of(reply.choices[0]), reply.choices[0].finish_reason


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_the_text_before_the_first_stop(server, tokenizer, kind, stream):
    client = openai_client(server)
    full, finish = answer(client, kind, stream, max_tokens=40)
    assert len(full) >= 20  # a long answer, so there is something to cut
    stop = full[8:11]  # three characters = three tokens: the stop spans several streamed pieces
    cut = full[:full.index(stop)]
    text, finish = answer(client, kind, stream, max_tokens=40, stop=stop)
    assert (text, finish) == (cut, "stop")
    later = full[14:16]
    first = min(full.index(later), full.index(stop))
    assert answer(client, kind, stream, max_tokens=40, stop=[later, "never said", stop]) == (full[:first], "stop")


def test_generation_ends_at_the_stop(server, tokenizer):
    _, ids = greedy_continuation(server.model, tokenizer, "the cat", 40)
    full = tokenizer.decode(ids)
    stop = full[8:11]
    reply = openai_client(server).completions.create(model=MODEL_NAME, prompt="the cat", temperature=0,
                                                     max_tokens=40, stop=stop)
    # one character per token: the model stopped at the token that completed the stop
    assert reply.usage.completion_tokens == full.index(stop) + len(stop) < 40


# -----------------------------------------------------------------------------
# Parameters we do not implement are refused by name

@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_unsupported_parameters_get_a_400_naming_them(server, kind):
    client = openai_client(server)
    if kind == "chat":
        create = lambda **kw: client.chat.completions.create(model=MODEL_NAME, messages=user("hi"), max_tokens=2, **kw)
        cases = [({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                 ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                 ({"response_format": {"type": "json_object"}}, "response_format")]
    else:
        create = lambda **kw: client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, **kw)
        cases = [({"logprobs": 0}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
                 ({"suffix": "!"}, "suffix")]
    cases += [({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
              ({"n": 2}, "n"), ({"logit_bias": {"5": 10}}, "logit_bias"),
              ({"stream_options": {"include_usage": True}, "stream": True}, "stream_options"),
              ({"extra_body": {"mirostat": 2}}, "mirostat")]
    for kwargs, name in cases:
        with pytest.raises(openai.BadRequestError) as e:
            create(**kwargs)
        assert e.value.status_code == 400 and e.value.param == name and name in e.value.message, (kwargs, e.value)
    # the same parameters at their defaults change nothing, so they are accepted
    create(presence_penalty=0, frequency_penalty=0.0, n=1, logit_bias={}, user="someone")


# -----------------------------------------------------------------------------
# Access control

API_KEY = "test-key-123"
OPEN_CALLS = {
    "models": lambda c: c.models.list(),
    "chat": lambda c: c.chat.completions.create(model=MODEL_NAME, messages=user("hi"), max_tokens=2),
    "chat stream": lambda c: list(c.chat.completions.create(model=MODEL_NAME, messages=user("hi"), max_tokens=2,
                                                            stream=True)),
    "completions": lambda c: c.completions.create(model=MODEL_NAME, prompt="the", max_tokens=2),
}


@pytest.fixture(scope="module")
def locked_server(tokenizer):
    app = create_app([Worker(tiny_model(tokenizer), tokenizer)], model_name=MODEL_NAME, api_key=API_KEY)
    with ChatServer(app) as s:
        yield s


def test_with_an_api_key_the_openai_client_needs_the_right_key(locked_server):
    wrong, right = openai_client(locked_server, "wrong-key"), openai_client(locked_server, API_KEY)
    for name, call in OPEN_CALLS.items():
        with pytest.raises(openai.AuthenticationError) as e:
            call(wrong)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key", name
        assert "wrong-key" not in e.value.message and API_KEY not in e.value.message  # no key is echoed
        call(right)  # raises if refused


def test_with_an_api_key_a_request_without_it_gets_401_but_the_page_and_health_stay_open(locked_server):
    post = {"messages": user("hi"), "max_tokens": 2}
    for method, path in [("GET", "/v1/models"), ("GET", "/stats"), ("POST", "/chat/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
        for headers in [None, {"Authorization": API_KEY}, {"Authorization": "Basic " + API_KEY},
                        {"Authorization": "Bearer"}]:
            status, body, got = request(locked_server.url, method, path, post if method == "POST" else None,
                                        headers=headers, full=True)
            assert status == 401, (path, headers)
            assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "missing_api_key"
            assert {k.lower(): v for k, v in got.items()}["www-authenticate"] == "Bearer"
    status, _ = request(locked_server.url, "POST", "/chat/completions", post,
                        headers={"Authorization": "bearer " + API_KEY})  # the scheme is case-insensitive
    assert status == 200
    assert request(locked_server.url, "GET", "/")[0] == 200
    assert request(locked_server.url, "GET", "/health")[0] == 200


@pytest.fixture
def base_dir(nanochat_base, monkeypatch, tokenizer, save_tiny_checkpoint):
    """A base checkpoint in a fresh NANOCHAT_BASE_DIR, and no API key in the environment."""
    save_tiny_checkpoint(nanochat_base / "base_checkpoints" / "tiny", 1, tiny_model(tokenizer, sequence_len=128),
                         tokenizer)
    monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    return nanochat_base


def serve(monkeypatch, *argv):
    """chat_web.main with uvicorn.run captured: the app it would serve."""
    import uvicorn
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    assert chat_web.main(["-i", "base", "--device", "cpu", *argv]) == 0
    return served["app"]


def test_serving_beyond_loopback_without_a_key_warns_and_the_env_key_locks_the_api(base_dir, monkeypatch, capsys):
    serve(monkeypatch, "--host", "0.0.0.0")
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0 without an API key" in err and "NANOCHAT_API_KEY" in err
    serve(monkeypatch, "--host", "127.0.0.1")
    assert "WARNING" not in capsys.readouterr().err

    monkeypatch.setenv("NANOCHAT_API_KEY", API_KEY)
    app = serve(monkeypatch, "--host", "0.0.0.0")
    out = capsys.readouterr()
    assert "WARNING" not in out.err and "API key required" in out.out
    with ChatServer(app) as server:
        with pytest.raises(openai.AuthenticationError):
            openai_client(server).models.list()
        reply = openai_client(server, API_KEY).completions.create(model="any", prompt="the", max_tokens=3)
        assert reply.usage.completion_tokens <= 3

    with pytest.raises(NanochatError, match="printable ASCII"):
        chat_web.main(["-i", "base", "--device", "cpu", "--api-key", "two words"])
    with pytest.raises(NanochatError, match="--api-key is empty"):
        chat_web.main(["-i", "base", "--device", "cpu", "--api-key", ""])

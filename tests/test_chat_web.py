"""
scripts.chat_web's server, against a tiny random model on 127.0.0.1: the official openai client
works (stream and not), our SSE stream is well-formed, bad input gets a 4xx with a JSON error
and leaves the server up, 32 concurrent clients are all answered, and a client that disconnects
frees its worker at once.
"""

import concurrent.futures
import http.client
import json
import time
import urllib.parse

import pytest

from nanochat.engine import Engine, StreamDecoder
from scripts.chat_web import MAX_MESSAGE_CHARS, MAX_MESSAGES, Worker, create_app
from tests.helpers_chat import ChatServer, long_talker, tiny_model, tiny_tokenizer

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


def expected_text(model, tokenizer, user_text, max_tokens):
    """The greedy answer, decoded the way the server streams it."""
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": user_text},
                                                           {"role": "assistant", "content": ""}]})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(t) for t in results[0][len(prompt):]) + decoder.flush(), len(prompt)


def request(url, method, path, body=None, raw=None, timeout=60):
    """(status, parsed JSON or text) over http.client."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text


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
    ("last message not the user's", json.dumps({"messages": user("a") + [{"role": "assistant", "content": "b"}]}).encode(), 400),
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

def test_32_concurrent_clients_are_all_answered_and_the_server_is_healthy_after(server):
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
    prompt = tokenizer.render_for_completion({"messages": user("the quick brown fox") + [{"role": "assistant", "content": ""}]})
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

"""
The chat page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright)
loads the page from a uvicorn server with a tiny model, sends a message, and watches the answer
stream in; then edits the message and regenerates, and stops a long answer midway; and against
a server that needs an API key, the key entered in the settings is what lets the page in.
Skips when no chromium binary is installed (`apt-get install chromium`).
"""

import shutil
import time

import pytest

from nanochat.engine import Engine, StreamDecoder
from scripts.chat_web import Worker, create_app
from tests.helpers_chat import ChatServer, long_talker, tiny_model, tiny_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")

PROMPT = "the quick brown fox"
MAX_TOKENS = 200


def greedy_answer(model, tokenizer, text, max_tokens):
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": text},
                                                           {"role": "assistant", "content": ""}]})
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    decoder = StreamDecoder(tokenizer)
    return "".join(decoder.push(t) for t in results[0][len(prompt):]) + decoder.flush()


@pytest.fixture(scope="module")
def served():
    tokenizer = tiny_tokenizer()
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": PROMPT},
                                                           {"role": "assistant", "content": ""}]})
    model = long_talker(tokenizer, prompt, MAX_TOKENS)  # a long answer, so streaming is visible
    forward = model.forward
    model.forward = lambda *a, **k: (time.sleep(0.005), forward(*a, **k))[1]  # ~1 s per answer
    worker = Worker(model, tokenizer)
    worker.engine.fast = None  # decode through the slowed-down model.forward, not the flat fast path
    with ChatServer(create_app([worker], max_tokens=MAX_TOKENS)) as server:
        yield server, model, tokenizer


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
    page.goto(url)
    page.click("#settings-toggle")
    page.fill("#temperature", "0")  # greedy: the answer is known in advance
    page.dispatch_event("#temperature", "change")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.dispatch_event("#max-tokens", "change")
    page.click("#settings-toggle")
    return page


def assistant_texts(page):
    return page.eval_on_selector_all(".message.assistant", "els => els.map(e => e.textContent)")


def test_a_message_sent_from_the_page_gets_a_streamed_answer(served, browser):
    server, model, tokenizer = served
    want = greedy_answer(model, tokenizer, PROMPT, MAX_TOKENS)
    page = open_page(browser, server.url)
    page.fill("#prompt", PROMPT)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant.streaming")
    assert page.text_content("#send") == "Stop"
    lengths = []
    while page.query_selector(".message.assistant.streaming") is not None:
        lengths.append(len(page.text_content(".message.assistant") or ""))
        page.wait_for_timeout(30)
    assert len(set(lengths)) >= 3  # the text grew in several steps while streaming
    assert assistant_texts(page) == [want]
    assert page.eval_on_selector_all(".message.user", "els => els.map(e => e.textContent)") == [PROMPT]
    assert page.text_content("#send") == "Send"
    # the page fits a phone screen: no horizontal scrolling
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.close()


def test_editing_a_message_regenerates_and_new_chat_clears(served, browser):
    server, model, tokenizer = served
    page = open_page(browser, server.url)
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)
    page.click(".message.user")
    page.fill(".editor textarea", "the lazy dog")
    page.click(".editor button.primary")
    page.wait_for_selector(".message.assistant.streaming")
    page.wait_for_selector(".message.assistant.streaming", state="detached", timeout=60_000)
    assert page.eval_on_selector_all(".message.user", "els => els.map(e => e.textContent)") == ["the lazy dog"]
    assert assistant_texts(page) == [greedy_answer(model, tokenizer, "the lazy dog", MAX_TOKENS)]
    page.click("#new-chat")
    assert page.query_selector_all(".message") == []
    page.close()


def test_the_stop_button_ends_the_answer_early(served, browser):
    server, model, tokenizer = served
    want = greedy_answer(model, tokenizer, PROMPT, MAX_TOKENS)
    page = open_page(browser, server.url)
    page.fill("#prompt", PROMPT)
    page.click("#send")
    page.wait_for_function("() => (document.querySelector('.message.assistant') || {}).textContent?.length > 5")
    page.click("#send")  # the button reads Stop while streaming
    page.wait_for_selector(".message.assistant.streaming", state="detached")
    (partial,) = assistant_texts(page)
    assert partial and want.startswith(partial) and len(partial) < len(want)
    assert page.text_content("#send") == "Send"
    page.close()


def test_the_api_key_from_the_settings_lets_the_page_in(browser):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with ChatServer(create_app([Worker(model, tokenizer)], api_key="page-key-1")) as server:
        page = open_page(browser, server.url)
        page.fill("#prompt", "lazy dog")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.error")
        assert "API key" in page.text_content(".message.error")
        assert page.is_visible("#api-key")  # the settings opened where the key goes
        assert page.input_value("#prompt") == "lazy dog"  # the message was given back, not lost
        page.fill("#api-key", "page-key-1")
        page.dispatch_event("#api-key", "change")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)
        assert assistant_texts(page) == [greedy_answer(model, tokenizer, "lazy dog", MAX_TOKENS)]
        page.reload()  # the key is remembered in this browser
        assert page.input_value("#api-key") == "page-key-1"
        page.close()

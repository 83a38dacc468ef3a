"""The web chat page in Debian's headless chromium (driven by Playwright): type, send, watch the answer stream,
keep history, stop, regenerate; and the Markdown renderer never turns model text into HTML."""

from __future__ import annotations

import json
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(live, tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium); the web page is untested")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, timeout=60_000
        )
        pg = ctx.new_page()
        pg.set_default_timeout(20_000)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        try:
            pg.goto(live.url + "/")
            pg.fill("#api-key", "test-key")
            pg.dispatch_event("#api-key", "change")
            pg.wait_for_function("document.getElementById('model-name').textContent.startsWith('model: tiny-test')")
            yield pg
        finally:
            ctx.close()  # before leaving sync_playwright, or its exit waits on the open browser
    assert not errors, errors


def assistant_texts(page) -> list[str]:
    return page.eval_on_selector_all(".msg.assistant .body", "els => els.map(e => e.textContent)")


def test_send_streams_an_answer_and_keeps_history(page):
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.fill("#system", "Be brief.")
    page.fill("#max-tokens", "120")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    with page.expect_response("**/v1/chat/completions") as resp:
        page.fill("#input", "Hello there, who are you?")
        page.keyboard.press("Enter")
    assert resp.value.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector(".msg.assistant:not(.streaming)")
    events = [json.loads(line[6:]) for line in resp.value.text().splitlines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert len(events) > 10 and streamed.strip()  # the answer came as a stream of many chunks...
    shown = assistant_texts(page)[0]
    rendered = page.evaluate(
        "t => { const d = document.createElement('div'); d.appendChild(renderMarkdown(t)); return d.textContent; }",
        streamed,
    )
    assert shown == rendered  # ...and the page shows all of it, through the Markdown renderer
    assert page.text_content(".msg.user .body") == "Hello there, who are you?"
    assert bodies[-1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert bodies[-1]["stream"] is True and bodies[-1]["max_tokens"] == 120 and bodies[-1]["temperature"] == 0

    page.fill("#input", "And then?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length === 2")
    sent = bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[2]["content"] == streamed  # the history carries the streamed answer

    before = assistant_texts(page)
    page.click("#regenerate")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length === 2")
    assert assistant_texts(page) == before  # greedy: the regenerated answer is the same, replacing the old one
    assert [m["role"] for m in bodies[-1]["messages"]] == ["system", "user", "assistant", "user"]


def test_stop_ends_a_long_answer(page, live):
    cancelled = live.engine.stats.requests_cancelled
    page.click("#new-chat")
    assert page.eval_on_selector_all(".msg", "els => els.length") == 0
    page.fill("#max-tokens", "800")
    page.fill("#input", "Tell me everything about Paris.")  # greedy: 800 tokens without an end of turn
    page.click("#send")
    page.wait_for_function(
        "(() => { const b = document.querySelector('.msg.assistant.streaming .body'); "
        "return b !== null && b.textContent.length > 0; })()"
    )
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === '(stopped)'")
    assert page.is_enabled("#send") and page.is_hidden("#stop")
    for _ in range(100):  # the aborted fetch is a client going away: the server cancels the request
        if live.engine.stats.requests_cancelled > cancelled:
            break
        page.wait_for_timeout(50)
    assert live.engine.stats.requests_cancelled == cancelled + 1


def test_markdown_is_rendered_and_html_is_not(page):
    out = page.evaluate(
        r"""() => {
        const div = document.createElement('div');
        div.appendChild(renderMarkdown("# Title\n<img src=x onerror=\"window.pwned=1\"> **bold** and `a<b`\n" +
            "- one\n- two\n\n```python\nif x < 1:\n    print('<script>')\n```\n[ok](https://example.org) " +
            "[bad](javascript:alert(1))"));
        return {html: div.innerHTML, imgs: div.querySelectorAll('img, script').length,
                code: div.querySelector('pre code').textContent, lang: div.querySelector('pre code').className,
                links: [...div.querySelectorAll('a')].map(a => a.href), items: div.querySelectorAll('li').length,
                h1: div.querySelector('h1').textContent, strong: div.querySelector('strong').textContent};
    }"""
    )
    assert out["imgs"] == 0 and "&lt;img" in out["html"]
    assert out["code"] == "if x < 1:\n    print('<script>')" and out["lang"] == "language-python"
    assert out["links"] == ["https://example.org/"] and out["items"] == 2
    assert out["h1"] == "Title" and out["strong"] == "bold"
    assert page.evaluate("window.pwned === undefined")


def test_reasoning_is_shown_folded_as_text_and_sent_back(page):
    """A stream with reasoning_content (serve --reasoning, tinychat.serve.reasoning): the page shows it folded
    above the answer, as text, and sends it back in the history. The stream is canned: a random test model
    does not think."""

    def chunk(delta: dict, finish: str | None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    sse = (
        "".join(
            chunk(d, f)
            for d, f in [
                ({"role": "assistant", "content": ""}, None),
                ({"reasoning_content": "It is <b>headquartered</b>"}, None),
                ({"reasoning_content": " in Dalzan."}, None),
                ({"content": '{"answer": "Dalzan"}'}, None),
                ({}, "stop"),
            ]
        )
        + "data: [DONE]\n\n"
    )
    page.click("#new-chat")
    page.route("**/v1/chat/completions", lambda r: r.fulfill(status=200, content_type="text/event-stream", body=sse))
    try:
        page.fill("#input", "Where is it? Reply in JSON.")
        page.click("#send")
        page.wait_for_selector(".msg.assistant:not(.streaming)")
        assert page.text_content(".msg.assistant details.reasoning > div") == "It is <b>headquartered</b> in Dalzan."
        assert page.eval_on_selector_all(".msg.assistant details.reasoning b", "els => els.length") == 0
        assert page.eval_on_selector(".msg.assistant details.reasoning", "d => d.open") is False
        assert assistant_texts(page) == ['{"answer": "Dalzan"}']
        with page.expect_request("**/v1/chat/completions") as req:
            page.fill("#input", "Thanks.")
            page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length === 2")
        sent = json.loads(req.value.post_data)["messages"]
        assert sent[-2] == {
            "role": "assistant",
            "reasoning_content": "It is <b>headquartered</b> in Dalzan.",
            "content": '{"answer": "Dalzan"}',
        }
    finally:
        page.unroute("**/v1/chat/completions")

"""Every bad input gets OpenAI's error shape with the right status, never a 500, and the server lives on."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse

import httpx2 as httpx
import openai
import pytest

from tinychat.infer.engine import EngineConfig

MODEL = "tiny-test"
MSGS = [{"role": "user", "content": "hi"}]


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.body
    assert set(body) >= {"message", "type", "param", "code"}, body  # the client unwraps {"error": {...}}
    return body


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
        ({"tool_choice": "required"}, None),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"n": 99}, "n"),
    ],
)
def test_bad_fields_are_400(client, kw, param):
    args = {"model": MODEL, "messages": MSGS, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    err = error_of(e.value)
    assert err["type"] == "invalid_request_error" and err["message"].endswith(".")
    if param is not None:
        assert err["param"] == param


def test_a_tool_result_must_answer_an_earlier_call(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    asked = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]}]
    ok = client.chat.completions.create(
        model=MODEL, messages=[*asked, {"role": "tool", "tool_call_id": "call_1", "content": "1"}], max_tokens=2
    )
    assert ok.choices[0].message.role == "assistant"
    for messages, param in (
        ([*asked, {"role": "tool", "tool_call_id": "call_2", "content": "1"}], "messages[2].tool_call_id"),
        ([*MSGS, {"role": "tool", "tool_call_id": "call_1", "content": "1"}, asked[1]], "messages[1].tool_call_id"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert error_of(e.value)["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=MSGS)
    assert error_of(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-17", input="x")


def test_context_window_is_400_with_the_numbers(client, live):
    ctx = live.engine.max_len
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=ctx)
    err = error_of(e.value)
    n_prompt = len(live.tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True))
    assert err["code"] == "context_length_exceeded"
    assert f"maximum context length is {ctx} tokens" in err["message"]
    assert f"{n_prompt + ctx} tokens ({n_prompt} in the messages, {ctx} in the completion)" in err["message"]
    long_prompt = "fox " * (ctx + 10)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.embeddings.create(model=MODEL, input=long_prompt)


def test_api_key_is_required(live, raw_request):
    with pytest.raises(openai.AuthenticationError) as e:
        live.client(api_key="wrong").models.list()
    assert error_of(e.value)["code"] == "invalid_api_key"
    status, body = raw_request(live.url, "POST", "/v1/chat/completions", b"{not json", auth=False)
    assert status == 401 and "API key" in body["error"]["message"]
    assert raw_request(live.url, "GET", "/health", auth=False)[0] == 200  # health and the page stay open


def test_malformed_bodies_and_routes(live, raw_request):
    for body in (b"{not json", b"", b"[1, 2]", b'{"model": "tiny-test", "messages": "hi"}'):
        status, out = raw_request(live.url, "POST", "/v1/chat/completions", body)
        assert status == 400 and out["error"]["type"] == "invalid_request_error", (body, out)
    assert raw_request(live.url, "GET", "/v1/no/such/route")[0] == 404
    status, out = raw_request(live.url, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in out
    assert raw_request(live.url, "GET", "/health")[1] == {"status": "ok"}
    u = urllib.parse.urlparse(live.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:  # announces 1 GB, sends nothing
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def test_405_names_the_allowed_methods(live):
    r = httpx.get(live.base_url + "/chat/completions", headers={"Authorization": "Bearer test-key"}, timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]


def test_overload_is_429_and_the_queue_drains(start_server, model_dir):
    """One slot and a queue of one: a third concurrent request is refused with 429, the others complete."""
    srv = start_server(model_dir, EngineConfig(max_num_seqs=1, max_queue=1))
    try:
        client = srv.client()
        no_eos = {str(t): -100 for t in srv.tok.stop_ids}
        first = client.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=900, stream=True, logit_bias=no_eos
        )
        next(iter(first))  # the role chunk: sent before the engine has necessarily admitted the request
        for _ in range(400):  # until it holds the only slot (for ~900 decode steps); 20 s at most
            if srv.engine.stats.running_seqs == 1:
                break
            time.sleep(0.05)
        result: dict = {}
        waiter = threading.Thread(
            target=lambda: result.update(r=client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2))
        )
        waiter.start()
        for _ in range(400):  # until the second request is queued (20 s at most, for a loaded machine)
            if srv.engine.stats.queue_depth == 1:
                break
            time.sleep(0.05)
        assert srv.engine.stats.queue_depth == 1 and srv.engine.stats.running_seqs == 1
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
        assert e.value.response.headers.get("retry-after") == "1"
        first.close()  # hang up: the slot frees and the queued request runs
        waiter.join(timeout=30)
        assert result["r"].choices[0].message.role == "assistant"
        assert srv.engine.stats.requests_rejected == 1
    finally:
        srv.close()


def test_server_survives(live, raw_request):
    u = urllib.parse.urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok"}
    status, text = raw_request(live.url, "GET", "/metrics", raw=True)
    assert status == 200 and 'tinychat_http_responses_total{route="/v1/chat/completions",code="500"}' not in text

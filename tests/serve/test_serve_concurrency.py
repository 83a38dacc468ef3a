"""Sixteen clients at once get what each gets alone; a client that hangs up frees its slot at once."""

from __future__ import annotations

import re
import socket
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

MODEL = "tiny-test"
TOPICS = "fox dog Paris tools chat models lazy quick brown jumps over while learn call tiny a".split()


def prompt(i: int) -> list[dict]:
    words = " ".join(TOPICS[(i * 7 + k) % len(TOPICS)] for k in range(3 + i % 5))
    return [{"role": "user", "content": f"Tell me about {words}."}]


def stream_text(client, i: int) -> str:
    stream = client.chat.completions.create(model=MODEL, messages=prompt(i), max_tokens=24, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def metric(raw_request, url: str, name: str) -> float:
    _, text = raw_request(url, "GET", "/metrics", raw=True)
    m = re.search(rf"^tinychat_{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_sixteen_concurrent_streams_equal_sequential_greedy(live, client):
    sequential = [stream_text(client, i) for i in range(16)]
    assert len(set(sequential)) > 8
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda i: stream_text(client, i), range(16)))
    assert concurrent == sequential
    assert live.engine.stats.free_slots == live.engine.num_slots


def open_request(url: str, path: str, body: str) -> socket.socket:
    """Send a POST on a raw socket, so that the test can hang up at a moment of its choosing."""
    u = urllib.parse.urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: Bearer test-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n\r\n"
    )
    sock.sendall((head + body).encode())
    return sock


def assert_freed_and_cancelled(live, raw_request, cancelled: float, generated: float, max_tokens: int) -> None:
    deadline = time.time() + 10
    while metric(raw_request, live.url, "running_sequences") != 0:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.02)
    assert metric(raw_request, live.url, "kv_slots_free") == live.engine.num_slots
    assert metric(raw_request, live.url, 'requests_total{status="cancelled"}') == cancelled + 1
    assert metric(raw_request, live.url, "generation_tokens_total") - generated < max_tokens  # it stopped early


def test_a_client_that_hangs_up_frees_its_slot(live, raw_request):
    cancelled = metric(raw_request, live.url, 'requests_total{status="cancelled"}')
    generated = metric(raw_request, live.url, "generation_tokens_total")
    no_eos = ", ".join(f'"{t}": -100' for t in live.tok.stop_ids)
    body = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Talk."}}], "max_tokens": 900, '
        f'"stream": true, "logit_bias": {{{no_eos}}}}}'
    )
    sock = open_request(live.url, "/v1/chat/completions", body)
    received = b""
    while received.count(b"data: ") < 5:  # a few tokens streamed: the request holds a slot now
        received += sock.recv(4096)
    assert metric(raw_request, live.url, "running_sequences") == 1
    sock.close()  # the client goes away mid-stream
    assert_freed_and_cancelled(live, raw_request, cancelled, generated, 900)


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(live, raw_request):
    """Tokens arrive faster than any poll interval: the handler must still notice that its caller left."""
    cancelled = metric(raw_request, live.url, 'requests_total{status="cancelled"}')
    generated = metric(raw_request, live.url, "generation_tokens_total")
    no_eos = ", ".join(f'"{t}": -100' for t in live.tok.stop_ids)
    max_tokens = live.engine.max_len - 16
    body = f'{{"model": "{MODEL}", "prompt": "Talk.", "max_tokens": {max_tokens}, "logit_bias": {{{no_eos}}}}}'
    sock = open_request(live.url, "/v1/completions", body)
    deadline = time.time() + 10
    while metric(raw_request, live.url, "running_sequences") != 1:  # admitted and generating
        assert time.time() < deadline, "the request never ran"
        time.sleep(0.005)
    sock.close()  # the client times out and goes away
    assert_freed_and_cancelled(live, raw_request, cancelled, generated, max_tokens)

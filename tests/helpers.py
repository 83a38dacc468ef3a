"""Small helpers the tests share (tests/ is on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WORDS = "the quick brown fox jumps over a lazy dog and then the small model learns to chat call tools".split()


def tiny_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        docs.append(f"{words.capitalize()}. {rng.randint(0, 9999)} + {rng.randint(0, 99)} 今天天气很好。\n")
    return docs


class ScriptedEndpoint(BaseHTTPRequestHandler):
    """Base of an in-test OpenAI-compatible endpoint: JSON replies, one listed model, no request logging.

    A subclass writes do_POST (its script) and answers with self._send(obj)."""

    def log_message(self, *a: Any) -> None:
        pass

    def _send(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send({"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})


@contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """http://127.0.0.1:PORT of `handler` served from a thread on a free port, for the block's duration."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()

"""A live tinychat server for the whole session: a tiny random model and a tokenizer trained here, uvicorn in
a thread on a free 127.0.0.1 port, the official `openai` client pointed at it."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tinychat.infer.engine import Engine, EngineConfig
from tinychat.model import Model, ModelConfig
from tinychat.tokenizer import Tokenizer, train_tokenizer

API_KEY = "test-key"
MODEL_NAME = "tiny-test"
WORDS = "the quick brown fox jumps over a lazy dog while tiny models learn to chat and call tools in Paris".split()


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        docs.append(f'{words.capitalize()}. {{"city": "Paris", "days": {rng.randint(0, 99)}}} ```print(1)```\n')
    return docs


def build_model_dir(path: Path, max_seq_len: int = 1024, seed: int = 0) -> Path:
    """Tokenizer (trained in ~50 ms) + a 2-layer random model, saved as an HF directory.

    init_std 0.2 (not 0.02) so the random model's greedy answers depend on the prompt instead of all being
    the same repeated token: equal outputs then really mean the same computation."""
    tok = train_tokenizer(make_corpus(), 600)
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=max_seq_len,
        eos_token_id=tok.im_end_id,
        init_std=0.2,
    )
    Model(cfg).save_pretrained(str(path))
    tok.save_pretrained(path)
    return path


@dataclass
class Live:
    url: str
    server: object
    thread: threading.Thread
    engine: Engine
    tok: Tokenizer

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kw):  # noqa: ANN201
        import openai

        return openai.OpenAI(**{"base_url": self.base_url, "api_key": API_KEY, "max_retries": 0, "timeout": 60, **kw})

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


def _start_server(
    model_dir: Path,
    engine_cfg: EngineConfig,
    api_key: str | None = API_KEY,
    adapters: dict[str, Path] | None = None,
    adapter_slots: int = 0,
    **app_kw: object,
) -> Live:
    """A live server; `adapters` ({name: LoRA directory}) are served beside the base (multi-LoRA), in
    `adapter_slots` slots of rank 8 when given (room for adapters loaded while serving)."""
    from tinychat.model.peft.multi_lora import serve_adapters
    from tinychat.serve.app import create_app

    model = Model.from_pretrained(str(model_dir))
    tok = Tokenizer.from_pretrained(model_dir)
    if adapter_slots:
        aset = serve_adapters(model, adapters or {}, capacity=adapter_slots, max_rank=8)
    else:
        aset = serve_adapters(model, adapters) if adapters else None
    engine = Engine(model, tok, engine_cfg, aset).start()
    app = create_app(engine, tok, MODEL_NAME, api_key=api_key, **app_kw)
    return Live(*_serve_app(app), engine=engine, tok=tok)


def _serve_app(app: object) -> tuple[str, object, threading.Thread]:
    """(base URL, uvicorn server, its thread) for `app` on a free 127.0.0.1 port, once it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-model"))


def _raw_request(
    url: str, method: str, path: str, body: bytes | None = None, auth: bool = True, raw: bool = False
) -> tuple[int, object]:
    """A plain HTTP request (stdlib only), for what the openai client will not send: broken JSON, wrong routes."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {API_KEY}"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text if raw else json.loads(text)


@pytest.fixture(scope="session")
def start_server():  # noqa: ANN201 - the factory, for tests that need a server of their own
    return _start_server


@pytest.fixture(scope="session")
def serve_app():  # noqa: ANN201 - the helper, for tests that build their own app
    return _serve_app


@pytest.fixture(scope="session")
def raw_request():  # noqa: ANN201
    return _raw_request


@pytest.fixture(scope="session")
def live(model_dir: Path) -> Iterator[Live]:
    srv = _start_server(model_dir, EngineConfig(max_num_seqs=16, prefill_chunk=64))
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def client(live: Live):  # noqa: ANN201
    return live.client()

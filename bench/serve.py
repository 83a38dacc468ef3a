"""Serving throughput and latency at 1, 4, 16 and 64 concurrent streaming clients, against a live server, one run.

    .venv/bin/python bench/serve.py [--model DIR] [--clients 1,4,16,64] [--requests 4] [--max-tokens 64]
    .venv/bin/python bench/serve.py --system-tokens 300 [--clients 1,16]   # shared system prompt, prefix cache on/off

Without --model a random `tiny` preset model (6.8M parameters) and a tokenizer trained on the spot are
served. The server (uvicorn + the continuous-batching engine) runs in this process on a free 127.0.0.1
port; each client is the official AsyncOpenAI client streaming chat completions back to back (a closed
loop), end-of-turn tokens banned through logit_bias so every request generates exactly --max-tokens.
Prints aggregate generated tokens/s and time to first token (p50, p95) per concurrency, and each as a
ratio to the 1-client run: continuous batching should raise tokens/s well above 1x while TTFT grows slowly.
Also printed: the KV memory at the peak and after the server has idled (the pool is dropped when idle).

With --system-tokens N every request starts with the same N-token system prompt, and the table is run twice,
with the engine's prefix cache on and off: TTFT with / without is the prefix cache's gain.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def build_model(path: Path, preset_name: str) -> Path:
    from tinychat.model import Model, preset
    from tinychat.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while small models learn to chat in Paris and Rome".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(2000)]
    tok = train_tokenizer(docs, 2048)
    torch.manual_seed(0)
    model = Model(preset(preset_name, vocab_size=tok.vocab_size, eos_token_id=tok.im_end_id))
    model.save_pretrained(str(path))
    tok.save_pretrained(path)
    return path


def start(model_dir: Path, slots: int, prefix_caching: bool = True):  # noqa: ANN201 - (url, server, thread, engine, tok)
    import uvicorn

    from tinychat.infer.engine import Engine, EngineConfig
    from tinychat.model import Model
    from tinychat.serve.app import create_app
    from tinychat.serve.cli import tokenizer_dir
    from tinychat.tokenizer import Tokenizer

    model = Model.from_pretrained(str(model_dir))
    tok = Tokenizer.from_pretrained(tokenizer_dir(model_dir))
    cfg = EngineConfig(max_num_seqs=slots, prefix_caching=prefix_caching, idle_release_s=1.0)
    engine = Engine(model, tok, cfg).start()
    app = create_app(engine, tok, "bench")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", server, thread, engine, tok


async def one_request(client, i: int, max_tokens: int, bias: dict[str, float], system: str) -> tuple[float, int]:  # noqa: ANN001
    """(time to first token, tokens generated) of one streamed chat completion."""
    t0 = time.perf_counter()
    ttft = None
    user = [{"role": "user", "content": f"Request {i}: tell me about the quick brown fox and Paris."}]
    stream = await client.chat.completions.create(
        model="bench",
        messages=([{"role": "system", "content": system}] if system else []) + user,
        max_tokens=max_tokens,
        temperature=0.8,
        seed=i,
        logit_bias=bias,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    async for chunk in stream:
        if ttft is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft if ttft is not None else time.perf_counter() - t0, tokens


async def run_level(
    url: str, clients: int, requests: int, max_tokens: int, bias: dict[str, float], system: str = ""
) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)

    async def worker(w: int) -> list[tuple[float, int]]:
        return [await one_request(client, w * 1000 + r, max_tokens, bias, system) for r in range(requests)]

    t0 = time.perf_counter()
    results = [x for part in await asyncio.gather(*(worker(w) for w in range(clients))) for x in part]
    wall = time.perf_counter() - t0
    await client.close()
    ttfts = sorted(t for t, _ in results)
    return {
        "clients": clients,
        "tok_s": sum(n for _, n in results) / wall,
        "p50": statistics.median(ttfts),
        "p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "requests": len(results),
    }


def system_prompt(tok, n: int) -> str:  # noqa: ANN001
    """A system prompt of about n tokens (the same for every request)."""
    words = "You are a careful assistant for the quick brown fox company in Paris and Rome".split()
    text, i = "", 0
    while len(tok.encode(text)) < n:
        text += words[i % len(words)] + " "
        i += 1
    return text.strip()


def table(args: argparse.Namespace, model_dir: Path, levels: list[int], prefix_caching: bool, label: str) -> list:
    url, server, thread, engine, tok = start(model_dir, max(levels), prefix_caching)
    bias = {str(t): -100.0 for t in tok.stop_ids}
    system = system_prompt(tok, args.system_tokens) if args.system_tokens else ""
    rows = []
    try:
        asyncio.run(run_level(url, 2, 1, 8, bias, system))  # warm-up (with the cache on, it now holds the prompt)
        n = engine.model.num_params() / 1e6
        print(
            f"{label}torch {torch.__version__}, {torch.get_num_threads()} threads, {n:.1f}M parameters, "
            f"max {engine.num_slots} sequences, {args.requests} requests/client, {args.max_tokens} tokens each"
            + (f", shared system prompt of {len(tok.encode(system))} tokens" if system else "")
        )
        print(f"{'clients':>8}{'tok/s':>10}{'x1':>7}{'TTFT p50':>11}{'x1':>7}{'TTFT p95':>11}{'x1':>7}{'KV MiB':>8}")
        base = None
        for c in levels:
            r = asyncio.run(run_level(url, c, args.requests, args.max_tokens, bias, system))
            r["kv"] = engine.kv_bytes / 2**20
            base = base or r
            rows.append(r)
            print(
                f"{c:>8}{r['tok_s']:>10.0f}{r['tok_s'] / base['tok_s']:>7.2f}"
                f"{r['p50'] * 1e3:>9.0f}ms{r['p50'] / base['p50']:>7.2f}"
                f"{r['p95'] * 1e3:>9.0f}ms{r['p95'] / base['p95']:>7.2f}{r['kv']:>8.1f}"
            )
        hits = engine.stats.prefix_hit_tokens / max(1, engine.stats.prompt_tokens)
        time.sleep(engine.cfg.idle_release_s + 1.0)
        engine._wake()
        time.sleep(0.6)
        print(
            f"prefix-cache hits {hits:.0%} of prompt tokens; KV memory after idling: {engine.kv_bytes / 2**20:.2f} MiB"
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, back to back")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of this many tokens")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp), args.preset)
        on = table(args, model_dir, levels, True, "prefix cache on: " if args.system_tokens else "")
        if args.system_tokens:
            off = table(args, model_dir, levels, False, "prefix cache off: ")
            for a, b in zip(on, off):
                print(
                    f"{a['clients']:>3} clients: TTFT p50 with/without prefix cache {a['p50'] / b['p50']:.2f}x, "
                    f"p95 {a['p95'] / b['p95']:.2f}x; tok/s {a['tok_s'] / b['tok_s']:.2f}x"
                )


if __name__ == "__main__":
    main()

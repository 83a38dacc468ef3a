"""Serving throughput and latency at 1, 4, 16 and 64 concurrent streaming clients, against a live server, one run.

    .venv/bin/python bench/serve.py [--model DIR] [--clients 1,4,16,64] [--requests 4] [--max-tokens 64]
    .venv/bin/python bench/serve.py --system-tokens 300 [--clients 1,16]   # shared system prompt, prefix cache on/off
    .venv/bin/python bench/serve.py --adapters 4 --clients 16                # multi-LoRA against the base alone

Without --model a random `tiny` preset model (6.8M parameters) and a tokenizer trained on the spot are
served. The server (uvicorn + the continuous-batching engine) runs in this process on a free 127.0.0.1
port; each client is the official AsyncOpenAI client streaming chat completions back to back (a closed
loop), end-of-turn tokens banned through logit_bias so every request generates exactly --max-tokens.
Prints aggregate generated tokens/s and time to first token (p50, p95) per concurrency, and each as a
ratio to the 1-client run: continuous batching should raise tokens/s well above 1x while TTFT grows slowly.
Also printed: the KV memory at the peak and after the server has idled (the pool is dropped when idle).

With --system-tokens N every request starts with the same N-token system prompt, and the table is run twice,
with the engine's prefix cache on and off: TTFT with / without is the prefix cache's gain.

With --spread N each request's length is drawn from --max-tokens ± N (seeded per client), so the closed-loop
clients fall out of step instead of sending their requests in bursts of one per client (docs/engine.md).

With --threads-ab 1,2 a real `tinychat serve --threads N` runs for each N, each in a process of its own, and the
load takes turns between them (--rounds, medians): the kernel threads' effect with the HTTP server beside them.

With --serve-ab 'OPTIONS A;OPTIONS B' the same, for any sets of `tinychat serve` options: e.g. the engine in the
server's process against the engine in its own (`--serve-ab '--threads 1;--threads 1 --engine_process true'`).
The table also prints each server's tokens/s and TTFT p95 as ratios to its own first (one-client) level.

With --compile the table runs with eager decoding and then with compiled decoding (`serve --compile`,
infer/compiled.py; a warm-up at every level compiles its batch-size buckets before the timed runs). With
--reference too (and 1 first in --clients), transformers' `generate` then runs the same request at batch 1 on
the same weights in this process, and one client's tokens/s is printed as a ratio to it: a reference whose
speed does not move with tinychat's code.

With --adapters N, N random rank --adapter-rank LoRA adapters (every projection, PEFT's files) are made for the
model and the same load runs on the base model alone (a plain server) and then spread round-robin over the N
adapters on a multi-LoRA server (`serve --adapter`, model/peft/multi_lora.py), once per --adapter-batching
mode; the ratio of aggregate tokens/s is the cost of serving adapters in shared batches (goal >= 0.8x).
The setups take turns (--rounds, medians printed). Also printed: this process's CPU time per generated
token (server and clients), whose ratio moves far less than tokens/s with a neighbour's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tinychat.serve.cli import kernel_threads


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


def build_adapters(model_dir: Path, out: Path, n: int, rank: int) -> dict[str, Path]:
    """n random LoRA adapters of `model_dir` (rank `rank`, every projection, B non-zero as after training)."""
    from tinychat.model import Model
    from tinychat.model.peft.lora import TARGETS, LoraConfig, save_adapter

    cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=list(TARGETS))
    shapes = {k: v.shape for k, v in Model.from_pretrained(str(model_dir)).state_dict().items()}
    out_dirs = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = {}
        for key, shape in shapes.items():
            if key.endswith(tuple(f"{t.split('.')[1]}.weight" for t in TARGETS.values())):
                (rows, cols), prefix = shape, key.removesuffix(".weight")
                state[prefix + ".lora_A.weight"] = torch.randn(rank, cols, generator=g) / cols**0.5
                state[prefix + ".lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.02
        save_adapter(out / f"lora{i}", state, cfg, model_dir)
        out_dirs[f"lora{i}"] = out / f"lora{i}"
    return out_dirs


def start(  # noqa: ANN201 - (url, server, thread, engine, tok)
    model_dir: Path,
    slots: int,
    prefix_caching: bool = True,
    adapters: dict | None = None,
    mode: str = "mask",
    compile: bool = False,
):
    import uvicorn

    from tinychat.infer.engine import Engine, EngineConfig
    from tinychat.model import Model
    from tinychat.model.peft.multi_lora import serve_adapters
    from tinychat.serve.app import create_app
    from tinychat.serve.cli import tokenizer_dir
    from tinychat.tokenizer import Tokenizer

    model = Model.from_pretrained(str(model_dir))
    tok = Tokenizer.from_pretrained(tokenizer_dir(model_dir))
    # idle longer than a client process takes to start (~1-2 s) before the pool and the prefix cache are dropped
    cfg = EngineConfig(max_num_seqs=slots, prefix_caching=prefix_caching, idle_release_s=5.0, compile=compile)
    aset = serve_adapters(model, adapters, mode) if adapters else None
    engine = Engine(model, tok, cfg, aset).start()
    app = create_app(engine, tok, "bench")
    # IPPROTO_TCP, as the sockets uvicorn.run binds from getaddrinfo: asyncio turns Nagle's algorithm off
    # (TCP_NODELAY) only on connections whose socket says so. With a plain socket.socket() (proto 0) every
    # response's first chunk after its headers waited for the client's delayed ACK, ~40 ms: that, not the
    # engine, was most of the time to first token measured before 2026-12-02.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", server, thread, engine, tok


async def one_request(  # noqa: PLR0913
    client,  # noqa: ANN001
    i: int,
    max_tokens: int,
    bias: dict[str, float],
    system: str,
    model: str = "bench",
) -> tuple[float, int]:
    """(time to first token, tokens generated) of one streamed chat completion."""
    t0 = time.perf_counter()
    ttft = None
    user = [{"role": "user", "content": f"Request {i}: tell me about the quick brown fox and Paris."}]
    stream = await client.chat.completions.create(
        model=model,
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


def transformers_reference(model_dir: Path, max_tokens: int, rounds: int = 5) -> float:
    """Tokens/s of transformers' `generate` at batch 1 on the same weights and in this process: the bench's
    request (its chat prompt, temperature 0.8, exactly `max_tokens` new tokens), median of `rounds`. Its speed
    does not move with tinychat's code, so "one client / transformers" compares runs of different code,
    machines and days (issue 18: one client at 3x the 131 tok/s of its filing)."""
    from transformers import AutoModelForCausalLM

    from tinychat.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    user = [{"role": "user", "content": "Request 0: tell me about the quick brown fox and Paris."}]
    ids = torch.tensor([tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=True, temperature=0.8, top_k=0)
    times = []
    with torch.no_grad():
        for i in range(rounds + 1):  # the first is a warm-up
            torch.manual_seed(i)
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.im_end_id, **kw)
            times.append(time.perf_counter() - t)
    return max_tokens / statistics.median(times[1:])


@dataclass
class Level:
    """One closed-loop load: `clients` streaming clients, each sending `requests` requests back to back;
    client w asks for models[w % len(models)] (the base, or adapters round-robin)."""

    url: str
    clients: int
    requests: int
    max_tokens: int
    bias: dict[str, float]
    system: str = ""
    models: tuple[str, ...] = ("bench",)
    spread: int = 0  # each request's length drawn from max_tokens ± spread (seeded): clients fall out of step


async def run_level(lv: Level) -> dict:
    """The load of `lv` from this process; tokens/s, TTFT p50/p95 and this process's CPU time per token."""
    import openai

    client = openai.AsyncOpenAI(base_url=lv.url, api_key="none", max_retries=0, timeout=600)

    async def worker(w: int) -> list[tuple[float, int]]:
        m = lv.models[w % len(lv.models)]
        reqs = range(lv.requests)
        rng = random.Random(w)
        lengths = [lv.max_tokens + rng.randint(-lv.spread, lv.spread) for _ in reqs]
        return [await one_request(client, w * 1000 + r, lengths[r], lv.bias, lv.system, m) for r in reqs]

    t0, cpu0 = time.perf_counter(), time.process_time()
    results = [x for part in await asyncio.gather(*(worker(w) for w in range(lv.clients))) for x in part]
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await client.close()
    ttfts = sorted(t for t, _ in results)
    return {
        "clients": lv.clients,
        "tok_s": sum(n for _, n in results) / wall,
        "wall": wall,
        "cpu_ms_tok": 1e3 * cpu / max(1, sum(n for _, n in results)),  # this process: the clients (and the server)
        "p50": statistics.median(ttfts),
        "p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "requests": len(results),
    }


IN_PROCESS = False  # --in-process-clients: the load in the server's own process, as before 2026-12-02


def load(lv: Level) -> dict:
    """`run_level` in a process of its own (or in this one with --in-process-clients).

    Why a process: clients in the server's process share its interpreter lock, so their per-chunk parsing
    (the OpenAI SDK validates every streamed chunk) takes turns with the engine's kernel dispatch, a cost no
    deployed server pays. On a 2-core machine the client process still takes CPU from the server; its CPU
    time per token is printed beside the server's."""
    if IN_PROCESS:
        return asyncio.run(run_level(lv))
    cpu0 = time.process_time()
    out = subprocess.run(
        [sys.executable, __file__, "--client-job", json.dumps(asdict(lv))],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"the client process failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = r["tok_s"] * r["wall"]
    r["client_cpu_ms_tok"] = r["cpu_ms_tok"]
    r["cpu_ms_tok"] = 1e3 * (time.process_time() - cpu0) / max(1.0, tokens)  # this process: the server alone
    return r


def client_job(spec: str) -> None:
    """The child side of `load`: one level's load, its result as a JSON line on stdout."""
    job = json.loads(spec)
    print(json.dumps(asyncio.run(run_level(Level(**job | {"models": tuple(job["models"])})))))


def system_prompt(tok, n: int) -> str:  # noqa: ANN001
    """A system prompt of about n tokens (the same for every request)."""
    words = "You are a careful assistant for the quick brown fox company in Paris and Rome".split()
    text, i = "", 0
    while len(tok.encode(text)) < n:
        text += words[i % len(words)] + " "
        i += 1
    return text.strip()


def table(  # noqa: PLR0913
    args: argparse.Namespace,
    model_dir: Path,
    levels: list[int],
    prefix_caching: bool,
    label: str,
    compile: bool = False,
) -> list:
    url, server, thread, engine, tok = start(model_dir, max(levels), prefix_caching, compile=compile)
    bias = {str(t): -100.0 for t in tok.stop_ids}
    system = system_prompt(tok, args.system_tokens) if args.system_tokens else ""
    rows = []
    try:
        load(Level(url, 2, 1, 8, bias, system))  # warm-up (with the cache on, it now holds the prompt)
        if compile:  # every batch-size bucket each level reaches compiles here, not in the timed runs
            for c in levels:
                load(Level(url, c, 2, args.max_tokens, bias, system))
        n = engine.model.num_params() / 1e6
        print(
            f"{label}torch {torch.__version__}, {torch.get_num_threads()} kernel threads, {n:.1f}M parameters, "
            f"max {engine.num_slots} sequences, {args.requests} requests/client, {args.max_tokens} tokens each"
            + (f" (± {args.spread}, drawn)" if args.spread else "")
            + ", "
            f"clients {'in the server process' if IN_PROCESS else 'in a process of their own'}"
            + (f", shared system prompt of {len(tok.encode(system))} tokens" if system else "")
        )
        print(
            f"{'clients':>8}{'tok/s':>10}{'x1':>7}{'TTFT p50':>11}{'x1':>7}{'TTFT p95':>11}{'x1':>7}{'KV MiB':>8}"
            f"{'CPU ms/tok server':>19}{'clients':>9}{'engine TTFT mean':>18}"
        )
        base = None
        for c in levels:
            t_sum, t_n = engine.stats.ttft_sum, engine.stats.ttft_count
            r = load(Level(url, c, args.requests, args.max_tokens, bias, system, spread=args.spread))
            r["kv"] = engine.kv_bytes / 2**20
            # the engine's own TTFT (submit to first token): what the client's TTFT spends outside the engine
            r["engine_ttft"] = (engine.stats.ttft_sum - t_sum) / max(1, engine.stats.ttft_count - t_n)
            base = base or r
            rows.append(r)
            print(
                f"{c:>8}{r['tok_s']:>10.0f}{r['tok_s'] / base['tok_s']:>7.2f}"
                f"{r['p50'] * 1e3:>9.0f}ms{r['p50'] / base['p50']:>7.2f}"
                f"{r['p95'] * 1e3:>9.0f}ms{r['p95'] / base['p95']:>7.2f}{r['kv']:>8.1f}"
                f"{r['cpu_ms_tok']:>19.2f}{r.get('client_cpu_ms_tok', float('nan')):>9.2f}"
                f"{r['engine_ttft'] * 1e3:>16.0f}ms"
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


def adapter_table(args: argparse.Namespace, model_dir: Path, levels: list[int], tmp: Path) -> None:
    """The same load on the base alone, then spread over --adapters LoRA adapters, per batching mode.

    Every server runs at once (an idle engine waits on its queue) and the setups take turns, --rounds times:
    a neighbour's load then touches every setup alike, and the median round per setup is printed."""
    adapters = build_adapters(model_dir, tmp / "adapters", args.adapters, args.adapter_rank)
    setups = [("base alone", None, "mask", ("bench",))]
    modes = args.adapter_batching.split(",")
    setups += [(f"{args.adapters} adapters, {m}", adapters, m, tuple(adapters)) for m in modes]
    setups += [("base on the adapter server", adapters, "mask", ("bench",))]
    servers = [start(model_dir, max(levels), True, ads, mode) for _, ads, mode, _ in setups]
    bias = {str(t): -100.0 for t in servers[0][4].stop_ids}
    runs: dict[str, dict[int, list[dict]]] = {label: {c: [] for c in levels} for label, *_ in setups}
    try:
        for (_, _, _, models), (url, *_) in zip(setups, servers):
            load(Level(url, 2, 1, 8, bias, "", models))  # warm-up
        for _ in range(args.rounds):
            for c in levels:
                for (label, _, _, models), (url, *_) in zip(setups, servers):
                    runs[label][c].append(load(Level(url, c, args.requests, args.max_tokens, bias, "", models)))
    finally:
        for _, server, thread, engine, _ in servers:
            server.should_exit = True
            thread.join(timeout=10)
            engine.stop()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.adapters} LoRA adapters of rank "
        f"{args.adapter_rank} on every projection, {args.requests} requests/client, {args.max_tokens} tokens each, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'setup':<32}{'clients':>8}{'tok/s':>10}{'x base':>8}{'TTFT p50':>11}{'TTFT p95':>11}"
        f"{'CPU ms/tok':>12}{'x base':>8}  rounds x base"
    )
    for c in levels:
        base = statistics.median(r["tok_s"] for r in runs["base alone"][c])
        base_cpu = statistics.median(r["cpu_ms_tok"] for r in runs["base alone"][c])
        for label, by_level in runs.items():
            rs = by_level[c]
            tok_s = statistics.median(r["tok_s"] for r in rs)
            p50, p95 = (statistics.median(r[k] for r in rs) * 1e3 for k in ("p50", "p95"))
            cpu = statistics.median(r["cpu_ms_tok"] for r in rs)
            each = " ".join(f"{r['tok_s'] / b['tok_s']:.2f}" for r, b in zip(rs, runs["base alone"][c]))
            print(
                f"{label:<32}{c:>8}{tok_s:>10.0f}{tok_s / base:>8.2f}{p50:>9.0f}ms{p95:>9.0f}ms"
                f"{cpu:>12.2f}{base_cpu / cpu:>8.2f}  {each}"
            )


def serve_process(model_dir: Path, *options: str) -> tuple[str, subprocess.Popen]:
    """A real `tinychat serve --model DIR OPTIONS...` in a process of its own, on a free port: its base URL
    (without /v1) and the process, once /health answers (bench/soak.py's server too). Options of the form
    NAME=VALUE set the server's environment instead (PYTHONPATH=<a worktree> serves another commit's code,
    TINYCHAT_NATIVE=0 turns the native kernels off), so --serve-ab compares code side by side too."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = [o for o in options if "=" in o and not o.startswith("-")]
    env = {**os.environ, **dict(o.split("=", 1) for o in settings)}
    options = tuple(o for o in options if o not in settings)
    cmd = [sys.executable, "-m", "tinychat.cli", "serve", "--model", str(model_dir), "--port", str(port), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # --compile builds two graphs at start: minutes with a cold inductor cache
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1).read()
            return base, proc
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read()[-2000:] if proc.stderr else ""
                raise SystemExit(f"tinychat serve failed: {err}") from None
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("tinychat serve did not answer within 5 minutes")


def servers_table(
    args: argparse.Namespace, model_dir: Path, levels: list[int], setups: list[tuple[str, list[str]]]
) -> None:
    """The same load on one real `tinychat serve` per setup (label, extra options): the servers run at once, each
    in its own process (thread counts are per process), and take turns for --rounds rounds (medians)."""
    from tinychat.tokenizer import Tokenizer

    options = ("--max_num_seqs", str(max(levels)), "--served_model_name", "bench")
    servers = [(f"{base}/v1", proc) for base, proc in (serve_process(model_dir, *options, *o) for _, o in setups)]
    tok = Tokenizer.from_pretrained(model_dir)
    bias = {str(t): -100.0 for t in tok.stop_ids}
    runs: list[dict[int, list[dict]]] = [{c: [] for c in levels} for _ in setups]
    try:
        for url, _ in servers:  # warm-up, a whole round at every level: a compiled server (--compile) compiles
            for c in levels:  # two graphs per batch bucket and key length it reaches, minutes with a cold cache
                load(Level(url, c, args.requests, args.max_tokens, bias))
        for _ in range(args.rounds):
            for c in levels:
                for k, (url, _) in enumerate(servers):
                    runs[k][c].append(load(Level(url, c, args.requests, args.max_tokens, bias)))
    finally:
        for _, proc in servers:
            proc.terminate()
            proc.wait(timeout=10)
    print(
        f"torch {torch.__version__}, each setup a `tinychat serve` in its own process, clients in another, "
        f"{args.requests} requests/client, {args.max_tokens} tokens each, median of {args.rounds} interleaved rounds"
    )
    width = max(len(label) for label, _ in setups)
    print(
        f"{'setup':>{width}}{'clients':>8}{'tok/s':>10}{'x first':>9}{'x 1 client':>11}{'TTFT p50':>11}{'TTFT p95':>11}"
        f"{'p95 x 1':>9}  rounds x first"
    )
    one = [statistics.median(r["tok_s"] for r in runs[k][levels[0]]) for k in range(len(setups))]
    one_p95 = [statistics.median(r["p95"] for r in runs[k][levels[0]]) for k in range(len(setups))]
    for c in levels:
        first = runs[0][c]
        base = statistics.median(r["tok_s"] for r in first)
        for k, (label, _) in enumerate(setups):
            rs = runs[k][c]
            tok_s = statistics.median(r["tok_s"] for r in rs)
            p50, p95 = (statistics.median(r[key] for r in rs) for key in ("p50", "p95"))
            each = " ".join(f"{r['tok_s'] / b['tok_s']:.2f}" for r, b in zip(rs, first))
            print(
                f"{label:>{width}}{c:>8}{tok_s:>10.0f}{tok_s / base:>9.2f}{tok_s / one[k]:>11.2f}{p50 * 1e3:>9.0f}ms"
                f"{p95 * 1e3:>9.0f}ms{p95 / one_p95[k]:>9.2f}  {each}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model directory (default: a random model of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, back to back")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--spread", type=int, default=0, help="draw each request's length from max-tokens ± this")
    ap.add_argument("--system-tokens", type=int, default=0, help="a shared system prompt of this many tokens")
    ap.add_argument("--adapters", type=int, default=0, help="spread the load over this many LoRA adapters too")
    ap.add_argument("--adapter-rank", type=int, default=8)
    ap.add_argument("--adapter-batching", default="mask,gather,group", help="multi-LoRA batching modes to measure")
    ap.add_argument("--rounds", type=int, default=3, help="--adapters: interleaved rounds of every setup")
    ap.add_argument("--compile", action="store_true", help="the table with eager and with compiled decoding")
    ap.add_argument(
        "--reference", action="store_true", help="with --compile: transformers' generate at batch 1 on the same weights"
    )
    ap.add_argument("--threads", type=int, default=0, help="the server's kernel threads (0: as `tinychat serve`)")
    ap.add_argument("--in-process-clients", action="store_true", help="the load in the server's process (old way)")
    ap.add_argument("--threads-ab", default="", help="e.g. 1,2: `tinychat serve --threads N` side by side")
    ap.add_argument(
        "--serve-ab",
        default="",
        help="real servers side by side, one per ';'-separated set of `tinychat serve` options, e.g. "
        "'--threads 1;--threads 1 --engine_process true'",
    )
    ap.add_argument("--client-job", default="", help=argparse.SUPPRESS)  # the client process of `load`
    args = ap.parse_args()
    if args.client_job:
        client_job(args.client_job)
        return
    global IN_PROCESS
    IN_PROCESS = args.in_process_clients
    torch.set_num_threads(kernel_threads(args.threads))
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp), args.preset)
        if args.adapters:
            adapter_table(args, model_dir, levels, Path(tmp))
            return
        if args.threads_ab or args.serve_ab:
            setups = [(f"--threads {n}", ["--threads", n]) for n in args.threads_ab.split(",") if n]
            setups += [(o.strip(), o.split()) for o in args.serve_ab.split(";") if o.strip()]
            servers_table(args, model_dir, levels, setups)
            return
        if args.compile:
            eager = table(args, model_dir, levels, True, "eager decoding: ")
            comp = table(args, model_dir, levels, True, "compiled decoding (engine compile=True): ", compile=True)
            for a, b in zip(comp, eager):
                print(
                    f"{a['clients']:>3} clients: compiled / eager tok/s {a['tok_s'] / b['tok_s']:.2f}x, "
                    f"TTFT p50 {a['p50'] / b['p50']:.2f}x, p95 {a['p95'] / b['p95']:.2f}x"
                )
            if args.reference and levels[0] == 1:
                ref = transformers_reference(model_dir, args.max_tokens)
                print(
                    f"transformers generate, batch 1, same weights and request: {ref:.0f} tok/s; one client "
                    f"{eager[0]['tok_s'] / ref:.2f}x of it eager, {comp[0]['tok_s'] / ref:.2f}x compiled"
                )
            return
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

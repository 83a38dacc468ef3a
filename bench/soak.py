"""Soak: 64 concurrent clients for 60 s against `tinychat serve`, some of them hanging up mid-request.

    .venv/bin/python bench/soak.py [--model DIR] [--clients 64] [--seconds 60] [--slots 16]

The server is a real `tinychat serve` subprocess (memory: its own resident set plus its engine process's);
without --model it serves a random `tiny` model with a tokenizer trained on the spot (bench/serve.py's). Each
client is the official AsyncOpenAI client in a closed loop; per request it draws one of:
  * stream (70%): a streamed chat completion read to the end, 32 tokens;
  * abandon (15%): a streamed one closed after its second chunk (a browser tab closed mid-answer);
  * timeout (15%): a non-streamed one whose client gives up after 0.3 s (the server must cancel it).
Errors are any failure other than those two deliberate hang-ups. Resident memory (VmRSS) is sampled
every 2 s; "growth" compares the last sample with the first one after the 10 s warm-up. After the clients
stop, /metrics must show every KV slot free, no KV block held and no running sequence within 30 s.
Goals (issues 21, 18): 0 errors, growth within 10%, every slot and every KV block freed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serve import build_model, serve_process  # bench/serve.py: a random tiny model; a `tinychat serve` process

STATUSES = ("finished", "cancelled", "failed", "rejected")


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its children: the server and, by default, its engine process."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:"))
    return total


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            out.append(int(stat.parent.name))
    return out


def metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("tinychat_")] = float(value)
    return out


async def client_loop(url: str, w: int, until: float, counts: dict[str, int], errors: list[str]) -> None:
    import openai

    rng = random.Random(w)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    quick = client.with_options(timeout=0.3)
    i = 0
    while time.monotonic() < until:
        i += 1
        kind = rng.choices(("stream", "abandon", "timeout"), (70, 15, 15))[0]
        messages = [{"role": "user", "content": f"Client {w}, request {i}: tell me about Paris."}]
        try:
            if kind == "timeout":
                try:
                    await quick.chat.completions.create(model="soak", messages=messages, max_tokens=64)
                    counts["timeout_finished"] += 1  # answered within 0.3 s: fine too
                except openai.APITimeoutError:
                    counts["timeout"] += 1
                continue
            stream = await client.chat.completions.create(
                model="soak", messages=messages, max_tokens=32, stream=True, seed=i
            )
            n = 0
            async for _ in stream:
                n += 1
                if kind == "abandon" and n == 2:
                    await stream.close()
                    break
            counts[kind] += 1
        except Exception as e:  # noqa: BLE001 - every other failure is what the soak counts
            errors.append(f"{kind}: {type(e).__name__}: {e}"[:200])
    await client.close()


async def run_clients(url: str, clients: int, seconds: float, counts: dict[str, int], errors: list[str]) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(url, w, until, counts, errors) for w in range(clients)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--slots", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "model", "tiny")
        options = ("--max_num_seqs", str(args.slots), "--served_model_name", "soak", "--max_queue", "1024")
        base, server = serve_process(model_dir, *options)
        try:
            counts = dict.fromkeys(("stream", "abandon", "timeout", "timeout_finished"), 0)
            errors: list[str] = []
            samples: list[tuple[float, float]] = []
            done = False

            def sample() -> None:
                t0 = time.monotonic()
                while not done:
                    samples.append((time.monotonic() - t0, rss_mb(server.pid)))
                    time.sleep(2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.monotonic()
            asyncio.run(run_clients(f"{base}/v1", args.clients, args.seconds, counts, errors))
            wall = time.monotonic() - t0
            drained = None
            for k in range(300):
                m = metrics(base)
                idle = m.get("running_sequences") == 0 and m.get("kv_slots_free") == m.get("kv_slots_total")
                if idle and m.get("kv_blocks_used", 0) == 0:  # paged engine: no block held by a sequence
                    drained = k * 0.1
                    break
                time.sleep(0.1)
            done = True
            sampler.join()
            m = metrics(base)
            warm = [r for t, r in samples if t >= 10] or [r for _, r in samples]
            growth = 100 * (warm[-1] - warm[0]) / warm[0]
            print(
                f"{args.clients} clients x {wall:.0f}s, {args.slots} slots: "
                + ", ".join(f"{k} {v}" for k, v in counts.items())
            )
            print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
            print(
                f"resident memory: {samples[0][1]:.0f} MB at start, {warm[0]:.0f} MB after warm-up, "
                f"{warm[-1]:.0f} MB at the end, max {max(r for _, r in samples):.0f} MB; growth {growth:+.1f}%"
            )
            print(
                "slots after the clients stopped: "
                + (f"all {m['kv_slots_total']:.0f} free after {drained:.1f}s" if drained is not None else "NOT freed")
                + f", KV blocks held {m.get('kv_blocks_used', -1):.0f} of {m.get('kv_blocks_total', -1):.0f}"
                + f", running {m.get('running_sequences', -1):.0f}, queued {m.get('queue_depth', -1):.0f}"
            )
            outcomes = {k: m.get("requests_total{status=" + f'"{k}"' + "}", 0) for k in STATUSES}
            print("engine requests: " + ", ".join(f"{k} {v:.0f}" for k, v in outcomes.items()))
            ok = not errors and abs(growth) <= 10 and drained is not None
            print("PASS" if ok else "FAIL")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

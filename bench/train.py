"""Training throughput and MFU: tinychat's loop vs a plain nanoGPT-style loop, side by side in one run.

    .venv/bin/python bench/train.py [--presets tiny,small] [--steps 30] [--compile]

Both train on the same batches of real text (the Python standard library's source, tokenized with a
BPE tokenizer trained here — offline and deterministic) with the same batch shape, learning rate and
schedule. tinychat runs through its real training loop (tinychat.train.loop.train); the baseline is
bench/nanogpt_baseline.py. Printed: tokens/s (median step after warm-up), MFU against this machine's
measured matmul peak, the mean loss of the last steps (equal loss = equal learning), and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanogpt_baseline import GPT  # noqa: E402

from tinychat.model import Model, preset  # noqa: E402
from tinychat.train.config import TrainConfig  # noqa: E402
from tinychat.train.loop import Objective, train  # noqa: E402
from tinychat.train.metrics import read_metrics  # noqa: E402
from tinychat.train.mfu import measure_peak_flops  # noqa: E402
from tinychat.train.optim import lr_factor  # noqa: E402
from tinychat.train.pretrain import lm_loss  # noqa: E402


def corpus_tokens(vocab: int, n_tokens: int) -> torch.Tensor:
    from tinychat.tokenizer import train_tokenizer

    root = Path(argparse.__file__).parent  # the standard library's own source: real text, always present
    files = sorted(root.glob("*.py"))[:200]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = train_tokenizer(texts, vocab)
    ids: list[int] = []
    for t in tok.encode_batch(texts):
        ids.extend(t + [tok.eot_id])
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


class StreamObjective(Objective):
    """Batches cut from one token tensor by step — identical for tinychat and the baseline."""

    name = "bench"

    def __init__(self, data: torch.Tensor, batch: int, seq: int) -> None:
        self.data, self.B, self.T = data, batch, seq

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * (self.T + 1)
        start = (step * n) % (len(self.data) - n)
        w = self.data[start : start + n].view(self.B, self.T + 1)
        return w[:, :-1], w[:, 1:]

    def micro_batches(self, step, model):  # noqa: ANN001
        return [self.batch_at(step)]

    def count(self, b) -> int:  # noqa: ANN001
        return b[1].numel()

    def tokens(self, b) -> int:  # noqa: ANN001
        return b[0].numel()

    def loss(self, model, b):  # noqa: ANN001
        return lm_loss(model, *b), {}


def run_tinychat(name: str, amp: str, data: torch.Tensor, cfg: TrainConfig, compile: bool) -> dict:
    torch.manual_seed(0)
    model = Model(preset(name, vocab_size=int(data.max()) + 1))
    tc = TrainConfig(**{**cfg.__dict__, "precision": amp, "compile": compile})
    with tempfile.TemporaryDirectory() as d:
        train(StreamObjective(data, cfg.batch_size, cfg.seq_len), model, tc, d, "bench")
        recs = read_metrics(Path(d), "bench", "train")
    flops = model.flops_per_token(cfg.seq_len)
    return summarise([r["step_time"] for r in recs], [r["loss"] for r in recs], flops, cfg, model.num_params())


def run_baseline(name: str, amp: str, data: torch.Tensor, cfg: TrainConfig) -> dict:
    torch.manual_seed(0)
    p = preset(name)
    model = GPT(int(data.max()) + 1, p.d_model, p.n_layer, p.n_head, cfg.seq_len)
    opt = model.configure_optimizer(cfg.lr)
    obj = StreamObjective(data, cfg.batch_size, cfg.seq_len)
    times, losses = [], []
    for step in range(cfg.max_steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, step / cfg.max_steps, cfg)
        x, y = obj.batch_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    return summarise(times, losses, model.flops_per_token(cfg.seq_len), cfg, n)


def summarise(times: list[float], losses: list[float], flops: float, cfg: TrainConfig, params: int) -> dict:
    warm = max(3, len(times) // 3)
    tok_s = cfg.batch_size * cfg.seq_len / statistics.median(times[warm:])
    return {"tok_s": tok_s, "flops": flops, "loss": statistics.mean(losses[-5:]), "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also measure tinychat with torch.compile")
    args = ap.parse_args()
    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=2e-3,
        warmup_steps=5,
        eval_every=0,
        checkpoint_every=0,
        tensorboard=False,
        log_every=10**9,
    )
    data = corpus_tokens(8192, 2_000_000)
    cpu = torch.device("cpu")
    peak = {
        a: measure_peak_flops(cpu, d, seconds=1.5, use_cache=False)
        for a, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul peak: "
        f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens, {len(data):,} tokens of stdlib source"
    )
    head = f"{'preset':<7}{'prec':<6}{'impl':<18}{'params':>8}{'tok/s':>9}{'MFU':>7}{'loss':>8}{'vs baseline':>13}"
    print(head)
    for name in args.presets.split(","):
        for amp in ("fp32", "bf16"):
            rows = [
                ("nanoGPT baseline", run_baseline(name, amp, data, cfg)),
                ("tinychat", run_tinychat(name, amp, data, cfg, compile=False)),
            ]
            if args.compile:
                rows.append(("tinychat+compile", run_tinychat(name, amp, data, cfg, compile=True)))
            base = rows[0][1]["tok_s"]
            for impl, r in rows:
                mfu = r["flops"] * r["tok_s"] / peak[amp]
                print(
                    f"{name:<7}{amp:<6}{impl:<18}{r['params'] / 1e6:>7.1f}M{r['tok_s']:>9.0f}{mfu:>7.1%}"
                    f"{r['loss']:>8.3f}{r['tok_s'] / base:>12.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()

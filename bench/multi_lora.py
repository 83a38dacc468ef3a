"""One decode step of a batch mixing LoRA adapters, against the base alone: aten ops and CPU time, per batching.

    .venv/bin/python bench/multi_lora.py [--preset tiny] [--batch 16] [--adapters 4] [--rank 8] [--context 64]

The model-level cost of multi-LoRA serving (model/peft/multi_lora.py), without the server around it: a random
--preset model (fused projections, as the engine runs it) decodes one token for --batch rows holding --context
cached positions each; the rows are spread over --adapters random LoRA adapters (rank --rank, every
projection), ordered by adapter as the engine orders its decode batch. Printed per setup: aten ops dispatched
per step (exact, from a dispatch counter) and the step's CPU time of this thread (one intra-op thread, the
minimum over repetitions: a neighbour's load moves it far less than wall time), each as a ratio to the base.
The end-to-end goal is measured by `bench/serve.py --adapters 4 --clients 16`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from serve import build_adapters, build_model
from torch.utils._python_dispatch import TorchDispatchMode

from tinychat.model import Model
from tinychat.model.peft.multi_lora import MODES, serve_adapters


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = {"preset": "tiny", "batch": 16, "adapters": 4, "rank": 8, "context": 64, "repeats": 20}
    for name, default in defaults.items():
        ap.add_argument(f"--{name}", type=type(default), default=default)
    args = ap.parse_args()
    torch.set_num_threads(1)
    B, ctx, dev = args.batch, args.context, torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.preset)
        adapters = build_adapters(model_dir, Path(tmp) / "adapters", args.adapters, args.rank)
        setups = {"base alone": (Model.from_pretrained(str(model_dir)).eval().fuse_projections(), None)}
        mixed = sorted(i % args.adapters + 1 for i in range(B))
        for mode in MODES:
            model = Model.from_pretrained(str(model_dir)).eval()
            aset = serve_adapters(model, adapters, mode)
            model.fuse_projections()
            setups[f"{args.adapters} adapters, {mode}"] = (model, aset.rows(mixed, dev, torch.float32))
            if mode == "mask":
                setups["1 adapter (every row)"] = (model, aset.rows([1] * B, dev, torch.float32))
    V = setups["base alone"][0].cfg.vocab_size
    x = torch.randint(0, V, (B, 1))
    ops, cpu, caches = {}, dict.fromkeys(setups, float("inf")), {}
    with torch.inference_mode():
        for name, (model, rows) in setups.items():
            caches[name] = cache = model.new_cache(B, ctx + 1)
            model(torch.randint(0, V, (B, ctx)), cache, adapters=rows)  # the context, prefilled once
            with OpCounter() as counter:
                cache.rewind(ctx)
                model(x, cache, adapters=rows)
            ops[name] = counter.n
        for _ in range(args.repeats):  # setups take turns: a neighbour's load touches each alike
            for name, (model, rows) in setups.items():
                t = time.thread_time()
                for _ in range(10):
                    caches[name].rewind(ctx)
                    model(x, caches[name], adapters=rows)
                cpu[name] = min(cpu[name], (time.thread_time() - t) / 10)
    n = setups["base alone"][0].num_params() / 1e6
    print(f"torch {torch.__version__}, 1 thread, {args.preset} ({n:.1f}M), batch {B} decoding at {ctx} positions, "
          f"{args.adapters} adapters of rank {args.rank} on every projection")  # fmt: skip
    print(f"{'setup':<26}{'aten ops':>10}{'x base':>8}{'CPU ms/step':>13}{'x base':>8}")
    for name in setups:
        print(
            f"{name:<26}{ops[name]:>10}{ops[name] / ops['base alone']:>8.2f}"
            f"{cpu[name] * 1e3:>13.2f}{cpu[name] / cpu['base alone']:>8.2f}"
        )


if __name__ == "__main__":
    main()

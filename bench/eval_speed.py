"""What batched generation's three savings buy an evaluation: the speedrun's suites on one model, with and without.

    .venv/bin/python bench/eval_speed.py --run runs/speedrun [--stage grpo] [--limit 300] [--reps 2]

The savings (tinychat/infer/generate.py): (1) the prefill runs the LM head on each row's last token only,
not on every prompt position; (2) a prefix common to every prompt of a batch (a system message with a tool
schema) is prefilled once and copied; (3) once half of the rows still decoding have finished, they leave
the batch. "before" turns all three off (the head on every position, no sharing, no dropping), "after" is
the shipped code. The arms alternate suite by suite, --reps times, so a change in the machine's load hits
both; printed are each suite's best seconds per arm and their ratio, and a check that both arms graded
every question alike (the savings change the cost, never the replies).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from tinychat.eval.backend import LocalCompleter, detect_mode, load
from tinychat.eval.suites import DEFAULT_SUITES, SuiteOptions, run_suite

gen = importlib.import_module("tinychat.infer.generate")  # the module: tinychat.infer exports a function of its name


def prefill_every_position(model, x, lengths, cache, shared=0):  # noqa: ANN001, ANN201, ARG001
    """The prefill before the savings: logits for every position, the last one read."""
    logits = model(x, cache, n_new=lengths)
    return logits[torch.arange(x.shape[0], device=x.device), lengths - 1]


@contextlib.contextmanager
def before() -> Iterator[None]:
    saved = gen.prefill, gen.SHARED_PREFIX_MIN, gen.DROP_FINISHED_AT
    gen.prefill, gen.SHARED_PREFIX_MIN, gen.DROP_FINISHED_AT = prefill_every_position, 10**9, 0.0
    try:
        yield
    finally:
        gen.prefill, gen.SHARED_PREFIX_MIN, gen.DROP_FINISHED_AT = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a speedrun's directory (its world and checkpoints)")
    ap.add_argument("--stage", default="grpo")
    ap.add_argument("--limit", type=int, default=300, help="questions per suite")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    run = Path(args.run)
    model_dir = run / "checkpoints" / args.stage
    model, tok = load(model_dir)
    completer = LocalCompleter(model, tok, batch_size=64)
    mode = detect_mode(model_dir, args.stage)
    opts = SuiteOptions(limit=args.limit)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {model_dir} ({mode}), {args.limit} rows")
    print(f"{'suite':<20} {'before s':>9} {'after s':>9} {'speed-up':>9}  same grades")
    totals = [0.0, 0.0]
    for suite in DEFAULT_SUITES:
        best = [float("inf"), float("inf")]
        grades: list[str] = ["", ""]
        for _ in range(args.reps):
            for arm in (0, 1):
                with before() if arm == 0 else contextlib.nullcontext():
                    t = time.perf_counter()
                    res = run_suite(completer, run / "world", suite, mode, opts)
                    best[arm] = min(best[arm], time.perf_counter() - t)
                grades[arm] = res["outcomes"]
        totals = [totals[0] + best[0], totals[1] + best[1]]
        same = "yes" if grades[0] == grades[1] else "NO"
        print(f"{suite:<20} {best[0]:>9.2f} {best[1]:>9.2f} {best[0] / best[1]:>8.2f}x  {same}")
    print(f"{'all suites':<20} {totals[0]:>9.2f} {totals[1]:>9.2f} {totals[0] / totals[1]:>8.2f}x")


if __name__ == "__main__":
    main()

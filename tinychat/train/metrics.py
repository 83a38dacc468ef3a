"""Where training numbers go: metrics.jsonl (the record the report is built from), TensorBoard, the console.

metrics.jsonl is append-only and one JSON object a line, tagged with the stage, so every stage of a
run shares one file and `tinychat report` can rebuild every table and plot from it alone. On resume
the lines past the resumed step are dropped, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, stage: str, enabled: bool, tensorboard: bool) -> None:
        self.path, self.stage, self.enabled = run_dir / "metrics.jsonl", stage, enabled
        self.tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(run_dir / "tensorboard" / stage))
                except ImportError:
                    print(
                        "note: tensorboard is not installed (pip install 'tinychat[all]'); curves: metrics.jsonl only",
                        file=sys.stderr,
                    )

    def truncate_after(self, step: int) -> None:
        """Drop this stage's records past `step` (they are about to be recomputed by a resumed run)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("stage") == self.stage and rec.get("step", 0) > step:
                continue
            kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        rec = {"stage": self.stage, "kind": kind, "step": step, "time": round(time.time(), 3), **clean}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path, stage: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (stage is None or rec.get("stage") == stage) and (kind is None or rec.get("kind") == kind):
            out.append(rec)
    return out


class Console:
    """A live progress bar on a terminal; plain log lines every `every` steps elsewhere (CI, files)."""

    def __init__(self, enabled: bool, total: int | None, every: int, desc: str) -> None:
        self.enabled, self.every = enabled, max(every, 1)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        elif step % self.every == 0:
            print(f"step {step:>6} | {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

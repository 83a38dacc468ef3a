"""Evaluation and the report card: bits per byte, tinyworld task suites, the lm-eval adapter, report.md + plots.

The speedrun calls two functions (see docs/eval.md and docs/report.md):

>>> from tinychat.eval import evaluate_stage, write_report
>>> evaluate_stage("runs/x", "sft", limit=40)   # suites + bits per byte, appended to runs/x/metrics.jsonl
>>> write_report("runs/x")                       # runs/x/report.md and runs/x/plots/*.png
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinychat.eval.report import write_report
    from tinychat.eval.run import evaluate_model, evaluate_stage

__all__ = ["evaluate_model", "evaluate_stage", "write_report"]


def __getattr__(name: str) -> Any:  # lazy: `tinychat report` should not pay for importing torch
    if name in ("evaluate_stage", "evaluate_model"):
        from tinychat.eval import run

        return getattr(run, name)
    if name == "write_report":
        from tinychat.eval.report import write_report

        return write_report
    raise AttributeError(f"module 'tinychat.eval' has no attribute {name!r}")

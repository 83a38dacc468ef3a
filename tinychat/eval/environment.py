"""Where a run ran: hardware, software versions and the code's git commit, recorded into the run directory.

Why recorded at evaluation time and not looked up by the report: a report may be re-rendered on another
machine, and a report card must describe the machine that produced the numbers. The speedrun's
evaluation stage writes runs/NAME/environment.json; `tinychat report` reads it, and only falls back to
the rendering machine (saying so) when a run never recorded one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV_FILE = "environment.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpus() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return ["Apple MPS"]
    return []


def git_commit(root: Path | None = None) -> dict[str, Any] | None:
    """{commit, dirty} of the tinychat checkout, or None outside a git repository (e.g. a pip install)."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def capture() -> dict[str, Any]:
    """Everything the report card says about the machine and the software."""
    import torch

    import tinychat
    from tinychat.device import usable_cores  # torch, like the import above: not at this module's import

    return {
        "hardware": {
            "cpu": cpu_model(),
            "cores": usable_cores(),
            "logical_cpus": os.cpu_count(),
            "ram_bytes": ram_bytes(),
            "gpus": gpus(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tinychat": getattr(tinychat, "__version__", "unknown"),
            "platform": platform.platform(),
        },
        "git": git_commit(),
    }


def record(run_dir: str | Path) -> dict[str, Any]:
    """Write run_dir/environment.json (atomically) and return it."""
    env = capture()
    path = Path(run_dir) / ENV_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(env, indent=1) + "\n")
    os.replace(tmp, path)
    return env


def read(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / ENV_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None

"""Finding the model directory a command should use, and its tokenizer.

Without --model, commands that run a model use the newest `runs/*/checkpoints/*/` directory that holds a
config.json (by that file's mtime): the layout the speedrun and every training command write. The
tokenizer sits in the model directory, or else in the run's `tokenizer/` directory. Kept in infer so that
everything that runs a model (serve, rag, agent, eval) can share it without importing the server.
"""

from __future__ import annotations

from pathlib import Path

from tinychat.errors import UserError


def how_to_get_one(runs: str | Path) -> str:
    """The one sentence said when there is no model to serve."""
    return (
        f"no model found under {runs}/*/checkpoints/: run `tinychat speedrun` to train one, or pass --model DIR "
        "(any directory saved by tinychat or transformers, e.g. from `tinychat model init`)."
    )


def find_latest_model(runs: str | Path = "runs") -> Path | None:
    """The newest `runs/*/checkpoints/*/` directory with a config.json (by the config's mtime), or None."""
    found = [p.parent for p in Path(runs).glob("*/checkpoints/*/config.json") if p.is_file()]
    return max(found, key=lambda d: (d / "config.json").stat().st_mtime) if found else None


def tokenizer_dir(model_dir: Path) -> Path:
    """The model directory itself when it has tokenizer files, else its run's tokenizer/ directory."""
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        from tinychat.model.peft.common import adapter_base  # an adapter directory: its base's tokenizer

        return tokenizer_dir(adapter_base(model_dir))
    run_tok = model_dir.parent.parent / "tokenizer"
    if model_dir.parent.name == "checkpoints" and (run_tok / "tokenizer.json").is_file():
        return run_tok
    raise UserError(f"{model_dir} has no tokenizer.json (nor does its run's tokenizer/ directory).")


def resolve_model(model: str, runs: str = "runs") -> Path:
    """--model (a directory or a Hugging Face id), else the newest model under `runs`."""
    from tinychat.model.hub import resolve_model_dir

    if model:
        p = resolve_model_dir(model)
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise UserError(f"--model {model}: expected a model directory with a config.json (or a PEFT adapter).")
        return p
    latest = find_latest_model(runs)
    if latest is None:
        raise UserError(how_to_get_one(runs))
    return latest

"""What every post-training command shares: options, where its inputs are, the starting model, the PEFT
method (LoRA, DoRA, IA3, prompt/prefix tuning: tinychat.model.peft), the frozen reference,
log-probabilities, and how the final model is written.

Why one module: sft, reward, dpo, ppo and grpo differ in their loss and their batches (their own files);
finding the run directory, the previous stage's model, the tinyworld split, applying an adapter and saving
merged weights + a PEFT adapter (or, for prompt/prefix methods, the adapter alone) is the same for all of
them and lives here once.

Run directory convention (runs/NAME/...): the starting model is the previous stage's final model
(sft <- pretrain; reward, dpo <- sft; ppo, grpo <- dpo if present, else sft) unless --init names one;
data defaults to the run's tinyworld split under runs/NAME/world/; the result is written to
runs/NAME/checkpoints/STAGE/ by the one training loop.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tinychat.config import dumps_toml, field
from tinychat.errors import UserError
from tinychat.model.hub import resolve_model_dir
from tinychat.model.peft import PREFIXED, UNMERGED, PeftConfig, adapters_disabled, apply_peft, has_adapters, save_result
from tinychat.model.peft.common import adapter_base, is_adapter_dir
from tinychat.model.peft.lora import LoraConfig
from tinychat.train.config import TrainConfig
from tinychat.train.loop import Objective, TrainResult, train


@dataclass
class PostConfig:
    """Options every post-training command has (each command's config adds its own)."""

    run: str = field("default", help="run name: everything goes to RUNS_DIR/NAME")
    runs_dir: str = field("runs")
    init: str = field("", help="starting model directory or hub id (default: the previous stage of this run)")
    data: str = field("", help="training rows: a JSONL/Parquet file or directory (default: the run's tinyworld split)")
    val_data: str = field("", help="validation rows (default: the tinyworld validation split, without --data)")
    tokenizer: str = field("", help="tokenizer directory (default: the starting model's, else RUNS_DIR/NAME/tokenizer)")
    resume: bool = field(False, help="continue from the newest checkpoint of this stage")
    stage: str = field("post", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    default_budget: ClassVar[dict[str, Any]] = {"epochs": 1.0}  # when no --train budget is given


def train_defaults(**kw: Any) -> Any:
    """A dataclass default for a command's [train] section with its own learning rate, warmup, ..."""
    return dataclasses.field(default_factory=lambda: TrainConfig(**kw))


@dataclass
class Inputs:
    run_dir: Path
    init: Path
    tok: Any  # tinychat Tokenizer
    tok_dir: Path
    data: Path
    val: Path | None


def locate(cfg: PostConfig, previous: tuple[str, ...], split: str, has_val: bool = True) -> Inputs:
    """Resolve the run directory, starting model, tokenizer and data of a command; UserError if any is missing."""
    from tinychat.tokenizer import Tokenizer

    run_dir = Path(cfg.runs_dir) / cfg.run
    cfg.peft.resolve(cfg.lora)  # a wrong --peft/--lora flag fails now, not after the data and model are loaded
    if cfg.init:
        init = resolve_model_dir(cfg.init)
        if not init.is_dir():
            raise UserError(f"--init {init} is not a directory.")
    else:
        found = [d for s in previous if is_model_or_adapter(d := run_dir / "checkpoints" / s)]
        if not found:
            names = " or ".join(str(run_dir / "checkpoints" / s) for s in previous)
            raise UserError(f"no --init given and there is no model at {names}; train that stage first or pass --init.")
        init = found[0]
        cfg.init = str(init)  # the saved config.STAGE.toml then names the model this run started from
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer)
    else:
        tok_dir = init if (init / "tokenizer.json").is_file() else run_dir / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file() and (init / "adapter_config.json").is_file():
            tok_dir = adapter_base(init)
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {tok_dir}; pass --tokenizer DIR.")
    world = run_dir / "world"
    data = Path(cfg.data) if cfg.data else world / split / "train.jsonl"
    if not data.exists():
        hint = "pass --data FILE" if cfg.data else f"run `tinychat world generate --out {world}` or pass --data"
        raise UserError(f"training data {data} does not exist; {hint}.")
    val = Path(cfg.val_data) if cfg.val_data else None
    if val is None and not cfg.data and has_val and (world / split / "val.jsonl").is_file():
        val = world / split / "val.jsonl"
    if val is not None and not val.exists():
        raise UserError(f"--val_data {val} does not exist.")
    return Inputs(run_dir, init, Tokenizer.from_pretrained(tok_dir), tok_dir, data, val)


def is_model_or_adapter(d: Path) -> bool:
    """A stage's result: a model directory, or (prompt/prefix methods) an adapter directory naming its base."""
    return (d / "config.json").is_file() or is_adapter_dir(d)


def load_causal_lm(path: Path) -> torch.nn.Module:
    """A model directory, or an adapter directory: its base is loaded and the adapter merged in (LoRA, DoRA,
    IA3) or attached unmerged and frozen (prompt/prefix methods)."""
    from tinychat.model.transformer import Model

    return Model.from_pretrained(str(path), dtype=torch.float32)  # model/hf.py opens adapter directories too


def start_model(cfg: PostConfig, inputs: Inputs) -> torch.nn.Module:
    """The starting model (--init or the previous stage), checked against the tokenizer and seq_len."""
    model = load_causal_lm(inputs.init)
    check_model(model, inputs.tok, cfg)
    return model


def check_model(model: torch.nn.Module, tok: Any, cfg: PostConfig) -> None:
    mcfg = model.cfg
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}.")
    if cfg.train.seq_len > mcfg.max_seq_len:
        raise UserError(
            f"train.seq_len ({cfg.train.seq_len}) is larger than the model's context window ({mcfg.max_seq_len}); "
            "raise it with `tinychat extend-context` first."
        )


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the starting model: the reference a KL term or DPO measures against."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def add_peft(model: torch.nn.Module, cfg: PostConfig, tok: Any, heads: tuple[str, ...] = ()) -> None:
    """Apply --peft.method (or --lora.rank): the base frozen, the adapter and the named heads trainable."""
    method = cfg.peft.resolve(cfg.lora)
    if "score" in heads and method in (*UNMERGED, "ia3"):
        raise UserError(f"--peft.method {method} cannot carry a reward model's score head; use lora or dora.")
    if method in PREFIXED and cfg.train.seq_len + cfg.peft.virtual_tokens > model.cfg.max_seq_len:
        raise UserError(
            f"train.seq_len ({cfg.train.seq_len}) + {cfg.peft.virtual_tokens} virtual tokens exceed the model's "
            f"context window ({model.cfg.max_seq_len}); lower --train.seq_len or --peft.virtual_tokens."
        )
    torch.manual_seed(cfg.train.seed)
    init_ids = tok.encode(cfg.peft.init_text) if method in ("prompt", "ptuning_v2") and cfg.peft.init_text else None
    summary = apply_peft(model, cfg.peft, cfg.lora, heads, init_ids)
    if summary:
        print(f"peft: {summary}")


def launch(cfg: PostConfig, objective: Objective, module: torch.nn.Module, inputs: Inputs) -> TrainResult:
    """Train `module` with `objective` on the one loop; with no budget given, the command's default budget."""
    t = cfg.train
    if not any((t.max_steps, t.max_tokens, t.max_time, t.epochs)):
        for key, value in cfg.default_budget.items():
            setattr(t, key, value)
        budget = ", ".join(f"{k} {v}" for k, v in cfg.default_budget.items())
        print(f"{cfg.stage}: no budget given (--train.max_steps, epochs, max_time, max_tokens); using {budget}")
    inputs.run_dir.mkdir(parents=True, exist_ok=True)
    (inputs.run_dir / f"config.{cfg.stage}.toml").write_text(dumps_toml(cfg))
    return train(
        objective, module, cfg.train, inputs.run_dir, cfg.stage, tokenizer_dir=inputs.tok_dir, resume=cfg.resume
    )


def report(name: str, result: TrainResult, keys: tuple[str, ...]) -> int:
    """One summary line, and the exit status (130 after Ctrl-C)."""
    ev = result.last_eval
    extra = "".join(f", {k} {ev[k]:.4g}" for k in keys if isinstance(ev.get(k), int | float))
    print(
        f"{name}: {result.steps} steps in {result.seconds / 60:.1f} min, loss {result.final_loss:.4f}{extra} "
        f"-> {result.model_dir}"
    )
    return 130 if result.interrupted else 0


def accumulation(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per step from --train.batch_tokens (a micro-batch holds batch_size x seq_len tokens)."""
    per_micro = cfg.batch_size * cfg.seq_len * world
    if cfg.batch_tokens and cfg.batch_tokens % per_micro:
        raise UserError(
            f"train.batch_tokens ({cfg.batch_tokens}) must be a multiple of batch_size x seq_len x ranks ({per_micro})."
        )
    return max(1, cfg.batch_tokens // per_micro) if cfg.batch_tokens else 1


# ---------------------------------------------------------------------------------------- log-probabilities


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position, in fp32: logits (B, T, V) predict targets (B, T)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution per position (B, T), in nats."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log p of the tokens where mask (B, T) is True, given everything before them: (B,)."""
    logp = token_logprobs(model(ids)[:, :-1], ids[:, 1:])
    return (logp * mask[:, 1:]).sum(-1)


class Reference:
    """The frozen model a KL term or DPO compares against: a separate copy, or the policy's own base
    with its adapters switched off (no second model in memory)."""

    def __init__(self, copy_of_start: torch.nn.Module | None) -> None:
        self.model = copy_of_start

    def to(self, device: torch.device) -> Reference:
        if self.model is not None:
            self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, policy: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Reference logits for ids (B, T); `policy` is the raw (unwrapped) trained module."""
        if self.model is not None:
            return self.model(ids)
        assert has_adapters(policy), "a reference without a copy needs adapters to switch off"
        with adapters_disabled(policy):
            return policy(ids)


def make_reference(model: torch.nn.Module, cfg: PostConfig) -> Reference:
    """Call before the adapter is applied: with one the base itself is the reference, else a frozen copy."""
    return Reference(None if cfg.peft.resolve(cfg.lora) != "none" else frozen_copy(model))


# ---------------------------------------------------------------------------------------- objectives


class PostObjective(Objective):
    """An objective of a post-training command: it writes merged weights (+ a PEFT adapter), or the adapter
    alone for prompt/prefix methods."""

    task_type = "CAUSAL_LM"
    chat = True  # every post-training row is a conversation in the chat template
    adapter_modules: tuple[str, ...] = ()  # whole modules saved with the adapter (a reward model's score)

    def __init__(self, cfg: PostConfig, tok: Any, init: Path) -> None:
        self.cfg, self.tok, self.init = cfg, tok, init

    def model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained module's state as the model to save (PPO drops its value head here)."""
        return state

    def write_model(self, model: torch.nn.Module, path: Path, state: dict[str, torch.Tensor]) -> None:
        from tinychat.model.hf import save_pretrained

        save_pretrained(model, path, dtype=torch.float32, state_dict=state)

    def save_model(self, model: torch.nn.Module, path: Path, state_dict: dict | None) -> None:
        """checkpoints/STAGE/ gets the full model (an adapter merged in) and the adapter in checkpoints/STAGE/adapter/;
        with a prompt/prefix method checkpoints/STAGE/ is the adapter directory itself."""
        state = self.model_state(state_dict if state_dict is not None else model.state_dict())
        merged = save_result(path, model, state, self.cfg.lora, self.init, self.task_type, self.adapter_modules)
        if merged is not None:
            self.write_model(model, path, merged)


class ItemObjective(PostObjective):
    """A post-training objective over a fixed list of training items (packed SFT rows, preference pairs):
    shuffled epochs, `batch_size` items per micro-batch, accumulation from --train.batch_tokens, split
    over ranks (chat_data.Schedule). Subclasses set `self.items` before setup and define `batch`."""

    items: list[Any]

    def batch(self, items: list[Any], model: torch.nn.Module) -> Any:
        """One micro-batch of `items`, on the device (`model` is the raw module, for a reference pass)."""
        raise NotImplementedError

    def setup(self, ctx: Any) -> None:
        from tinychat.train.chat_data import Schedule

        super().setup(ctx)
        c, d = self.cfg.train, ctx.dist
        self.accum = accumulation(c, d.world)
        self.sched = Schedule(len(self.items), c.batch_size, self.accum, d.world, d.rank, c.seed)

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        return [self.batch([self.items[i] for i in self.sched.items(step, m)], model) for m in range(self.accum)]

    def progress(self, step: int) -> float:
        return self.sched.progress(step)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.cfg.train.seed, "accum": self.accum, "items": len(self.items)}

    def eval_chunks(self, items: list[Any], limit: int = 0) -> list[list[Any]]:
        """This rank's share of validation items (the first `limit`, 0 = all), in micro-batches."""
        from tinychat.train.chat_data import shard

        mine, B = shard(items, self.ctx.dist.rank, self.ctx.dist.world, limit), self.cfg.train.batch_size
        return [mine[i : i + B] for i in range(0, len(mine), B)]

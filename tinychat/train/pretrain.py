"""Pretraining: next-token prediction on packed token shards — the first objective on the one loop.

`tinychat pretrain --config configs/cpu-tiny.toml [--dotted.overrides]` trains a model from scratch
(or continues one, `--init DIR`) on the shards that `tinychat data tokenize` wrote, into
runs/NAME/checkpoints/pretrain/. Evaluation reports validation loss and bits per byte (loss in bits
divided by the UTF-8 bytes the target tokens stand for, comparable across tokenizers) and a few sampled
continuations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tinychat.config import dumps_toml, field
from tinychat.errors import UserError
from tinychat.model.config import ModelConfig
from tinychat.model.loss import summed_ce
from tinychat.model.peft import PeftConfig
from tinychat.model.peft.lora import LoraConfig
from tinychat.model.transformer import Model
from tinychat.train.config import TrainConfig
from tinychat.train.copy_drills import DrillSource, shortest_row
from tinychat.train.loop import Objective, TrainContext, TrainResult, train
from tinychat.train.optim import mup_init


@dataclass
class PretrainConfig:
    run: str = field("default", help="run name: everything goes to RUNS_DIR/NAME")
    runs_dir: str = field("runs")
    data: str = field("", help="tokenized data directory (default RUNS_DIR/NAME/data/tokens)")
    tokenizer: str = field("", help="tokenizer directory (default RUNS_DIR/NAME/tokenizer)")
    init: str = field("", help="start from this model directory or hub id instead of random weights")
    resume: bool = field(False, help="continue from the newest checkpoint of this stage")
    stage: str = field("pretrain", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    samples: list[str] = field(["The", "Velmora", "12 + 7 ="], help="prompts sampled at each evaluation")
    trainable: Literal["all", "embeddings"] = field(
        "all", help="embeddings: train only the input embeddings and the output layer (Chinese-LLaMA's stage 1)"
    )
    drill_rows: float = field(
        0.0,
        help="share of each batch's rows that are copy drills (tinychat.train.copy_drills): keeps a copy circuit that "
        "a copy-drill stage formed from being trained away by the text",
    )
    drill_alphabet: int = field(
        1024, help="with drill_rows: drill ids from this many of the text's most frequent tokens (the copy stage's)"
    )
    vocab_init: Literal["mean", "random"] = field(
        "mean", help="rows for tokens the tokenizer adds to the --init model's own (see `tinychat model resize-vocab`)"
    )
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)


def has_fused_head(model: torch.nn.Module) -> bool:
    """Whether the model, under DDP or torch.compile, is tinychat's Model, whose forward takes `targets` (and
    `soft_targets`) and computes the loss with the head in row chunks (model/loss.py)."""
    return isinstance(getattr(model, "module", getattr(model, "_orig_mod", model)), Model)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over targets != -100, in fp32: the model's own fused head-and-loss
    (model/loss.py: no (tokens, vocab) logits), or the logits' cross-entropy for a model without it."""
    if has_fused_head(model):
        return model(x, targets=y)
    return summed_ce(model(x), y)


class PretrainObjective(Objective):
    name = "pretrain"

    def __init__(
        self,
        data_dir: Path,
        tokenizer: Any,
        cfg: TrainConfig,
        samples: list[str],
        lora: LoraConfig | None = None,
        init: Path | None = None,
        drill_rows: float = 0.0,
        drill_alphabet: int = 1024,
    ) -> None:
        self.data_dir, self.tok, self.cfg, self.samples = data_dir, tokenizer, cfg, samples
        self.lora, self.init = lora or LoraConfig(), init or Path("")
        self.drill_rows, self.drill_alphabet = drill_rows, drill_alphabet

    def setup(self, ctx: TrainContext) -> None:
        from tinychat.data.loader import PackedLoader
        from tinychat.tokenizer.bytes import token_byte_lengths

        super().setup(ctx)
        cfg, d = self.cfg, ctx.dist
        per_micro = cfg.batch_size * cfg.seq_len * d.world
        self.accum = max(1, cfg.batch_tokens // per_micro) if cfg.batch_tokens else 1
        if cfg.batch_tokens and cfg.batch_tokens % per_micro:
            raise UserError(
                f"train.batch_tokens ({cfg.batch_tokens}) must be a multiple of batch_size x seq_len x ranks "
                f"({per_micro})."
            )
        self.loader = PackedLoader(
            self.data_dir, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=d.rank, world_size=d.world
        )
        self.chat = self.loader.index.chat  # chat rows mixed into the text: the model learns the template here
        # a validation split too small for one batch fails here, not at the first evaluation minutes later
        PackedLoader(self.data_dir, cfg.batch_size, cfg.seq_len, split="val", rank=d.rank, world_size=d.world)
        self.token_bytes = torch.tensor(token_byte_lengths(self.tok), dtype=torch.float32, device=ctx.device)
        self.drills = None
        if self.drill_rows:
            self.drills = DrillSource.for_data(self.data_dir, self.tok, self.drill_alphabet)
            self.n_drill = max(1, round(cfg.batch_size * self.drill_rows))
            shortest = shortest_row(self.drills.sep, self.drills.lens[0])  # a row holds seq_len + 1 tokens
            if cfg.seq_len + 1 < shortest:
                raise UserError(f"--drill_rows needs train.seq_len of at least {shortest - 1} to hold a drill.")

    # loader step = optimiser step x accumulation + micro index: the global batch is the same set of
    # sequences whatever the split between ranks and accumulation (see tinychat.data.loader)
    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        dev = self.ctx.device
        out = []
        for m in range(self.accum):
            x, y = self.loader.batch(step * self.accum + m)
            if self.drills is not None:  # the last rows of the micro-batch become drills
                rng = np.random.default_rng((self.cfg.seed, step * self.accum + m, self.ctx.dist.rank))
                w = torch.from_numpy(self.drills.rows(rng, self.n_drill, x.shape[1] + 1))
                x, y = x.clone(), y.clone()
                x[-self.n_drill :], y[-self.n_drill :] = w[:, :-1], w[:, 1:]
            out.append((x.to(dev), y.to(dev)))
        return out

    def count(self, batch: Any) -> int:
        return batch[1].numel()

    def tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return lm_loss(model, *batch), {}

    def pipeline_io(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return summed_ce(output, target)

    def progress(self, step: int) -> float:
        return step * self.accum / self.loader.steps_per_epoch

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        result = evaluate_lm(model, self.data_dir, self.cfg, self.token_bytes, self.ctx)
        if self.ctx.dist.is_main and self.samples:
            result["samples"] = sample_texts(model, self.tok, self.samples, self.ctx)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "accum": self.accum}

    def save_model(self, model: torch.nn.Module, path: Path, state_dict: dict | None) -> None:
        """The model directory; with an adapter the merged weights, and the PEFT adapter in path/adapter
        (prompt/prefix methods: path is the adapter directory)."""
        from tinychat.model.hf import save_pretrained
        from tinychat.model.peft import save_result

        state = state_dict if state_dict is not None else model.state_dict()
        merged = save_result(path, model, state, self.lora, self.init)
        if merged is not None:
            save_pretrained(model, path, dtype=torch.float32, state_dict=merged)


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module, data_dir: Path, cfg: TrainConfig, token_bytes: torch.Tensor, ctx: TrainContext
) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte over the fixed validation batches of every rank."""
    from tinychat.data.loader import val_batches
    from tinychat.train.distributed import all_reduce_sum

    nats = torch.zeros((), device=ctx.device)
    n_tok = torch.zeros((), device=ctx.device)
    n_bytes = torch.zeros((), device=ctx.device)
    for x, y in val_batches(
        data_dir,
        cfg.batch_size,
        cfg.seq_len,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world,
        max_batches=cfg.eval_batches,
    ):
        x, y = x.to(ctx.device), y.to(ctx.device)
        with ctx.autocast():
            logits = model(x)
        per_tok = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nats += per_tok.sum()
        n_tok += y.numel()
        n_bytes += token_bytes[y.flatten()].sum()
    nats, n_tok, n_bytes = all_reduce_sum(torch.stack([nats, n_tok, n_bytes])).tolist()
    if n_tok == 0:
        return {}
    return {"val_loss": nats / n_tok, "val_bpb": nats / math.log(2) / max(n_bytes, 1.0), "val_tokens": n_tok}


def sample_texts(model: torch.nn.Module, tok: Any, prompts: list[str], ctx: TrainContext) -> list[dict[str, str]]:
    from tinychat.infer.generate import generate
    from tinychat.infer.sampling import SamplingParams

    raw = getattr(model, "module", model)
    if not hasattr(raw, "new_cache") or any(type(p).__name__ == "DTensor" for p in raw.parameters()):
        return []  # sharded (FSDP) weights: sampling would need a gather; the evaluation numbers suffice
    params = SamplingParams(temperature=0.0, max_new_tokens=24, seed=0)
    with ctx.autocast():
        outs = generate(raw, tok, prompts, params)
    return [{"prompt": p, "completion": o.text} for p, o in zip(prompts, outs)]


def check_inputs(cfg: PretrainConfig, mcfg: ModelConfig, data_dir: Path, tok: Any) -> dict[str, Any]:
    """Every mistake we can see before training starts, as one sentence each."""
    index_file = data_dir / "index.json"
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; run `tinychat data tokenize` first.")
    if not index_file.is_file():
        raise UserError(f"{index_file} is missing; {data_dir} is not a tokenized data directory.")
    index = json.loads(index_file.read_text())
    data_vocab = int(index.get("vocab_size", 0))
    if data_vocab and data_vocab != tok.vocab_size:
        raise UserError(
            f"{data_dir} was tokenized with a {data_vocab}-token vocabulary but the tokenizer has "
            f"{tok.vocab_size}; re-tokenize with this tokenizer."
        )
    if tok.vocab_size > mcfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}; "
            "to continue a model with an extended tokenizer, give --init a directory holding the model's own "
            "tokenizer, or run `tinychat model resize-vocab` first."
        )
    if cfg.train.seq_len > mcfg.max_seq_len:
        raise UserError(
            f"train.seq_len ({cfg.train.seq_len}) is larger than the model's context window "
            f"({mcfg.max_seq_len}); raise model.max_seq_len, or for an --init model run `tinychat extend-context` "
            "first, or lower train.seq_len."
        )
    return index


def grow_vocab(model: torch.nn.Module, init: Path, tok: Any, how: str, seed: int) -> None:
    """Continued pretraining with an extended tokenizer: if `tok` adds tokens to the one saved beside the --init
    model, give the model rows for them (tinychat.model.resize; old rows unchanged) before training starts."""
    from tinychat.model.resize import resize_for_tokenizer
    from tinychat.tokenizer import Tokenizer

    if not (init / "tokenizer.json").is_file():
        return  # nothing to compare with; check_inputs still refuses a tokenizer larger than the model
    old = Tokenizer.from_pretrained(init)
    if tok.vocab_size <= old.vocab_size:
        return  # the same tokenizer (or a user's own choice of one of the same size): trained as given
    rows = model.cfg.vocab_size
    _, new_ids = resize_for_tokenizer(model, old, tok, how, seed)  # UserError unless tok extends old
    print(
        f"pretrain: the tokenizer adds {len(new_ids)} tokens to {init}'s; {rows} -> {model.cfg.vocab_size} rows ({how})"
    )


def freeze_for_stage(model: torch.nn.Module, cfg: PretrainConfig, tok: Any = None) -> None:
    """Chinese-LLaMA's two stages of continued pretraining: embeddings and output layer only, or LoRA (plus
    whichever modules --lora.modules_to_save names, trained whole and saved with the adapter); or any other
    --peft.method for continued pretraining."""
    from tinychat.model.peft import apply_peft
    from tinychat.model.peft.lora import train_only

    if cfg.trainable == "embeddings":
        n, what = train_only(model, ["embed_tokens", "lm_head"]), "embeddings and output layer"
    else:
        torch.manual_seed(cfg.train.seed)
        init_ids = tok.encode(cfg.peft.init_text) if tok is not None and cfg.peft.init_text else None
        summary = apply_peft(model, cfg.peft, cfg.lora, init_ids=init_ids)
        if summary:
            print(f"pretrain: {summary}{''.join(' + ' + m for m in cfg.lora.modules_to_save)}")
        return
    total = sum(p.numel() for p in model.parameters())
    print(f"pretrain: {n:,} of {total:,} parameters trainable ({what})")


def prepare(cfg: PretrainConfig) -> tuple[Path, Path, Path, Any, torch.nn.Module]:
    """(run dir, tokenizer dir, data dir, tokenizer, model) with every input checked: shared with distill."""
    from tinychat.model.config import resolve
    from tinychat.tokenizer import Tokenizer

    run_dir = Path(cfg.runs_dir) / cfg.run
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else run_dir / "tokenizer"
    data_dir = Path(cfg.data) if cfg.data else run_dir / "data" / "tokens"
    if not tok_dir.is_dir():
        raise UserError(f"tokenizer directory {tok_dir} does not exist; run `tinychat tokenizer train` first.")
    tok = Tokenizer.from_pretrained(tok_dir)
    if cfg.trainable != "all" and cfg.peft.resolve(cfg.lora) != "none":
        raise UserError("--trainable embeddings and --lora.rank/--peft.method are two different stages; choose one.")
    cfg.peft.resolve(cfg.lora)  # a wrong --lora/--peft flag fails now, before any work
    if cfg.init:
        model = Model.from_pretrained(cfg.init, dtype=torch.float32)
        grow_vocab(model, Path(cfg.init), tok, cfg.vocab_init, cfg.train.seed)
        mcfg = model.cfg
    else:
        mcfg = resolve(cfg.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        model = None
    check_inputs(cfg, mcfg, data_dir, tok)
    if model is None:
        torch.manual_seed(cfg.train.seed)
        model = Model(mcfg)
        if cfg.train.mup_base_width:
            mup_init(model, cfg.train.mup_base_width)
    return run_dir, tok_dir, data_dir, tok, model


def write_config(cfg: PretrainConfig, run_dir: Path, model: torch.nn.Module) -> None:
    """runs/NAME/config.STAGE.toml: the resolved settings, model shape included."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"config.{cfg.stage}.toml").write_text(dumps_toml(dataclasses.replace(cfg, model=model.cfg)))


def run_pretrain(cfg: PretrainConfig) -> TrainResult:
    run_dir, tok_dir, data_dir, tok, model = prepare(cfg)
    freeze_for_stage(model, cfg, tok)
    write_config(cfg, run_dir, model)
    init = Path(cfg.init) if cfg.init else None
    objective = PretrainObjective(
        data_dir, tok, cfg.train, cfg.samples, cfg.lora, init, cfg.drill_rows, cfg.drill_alphabet
    )
    return train(objective, model, cfg.train, run_dir, cfg.stage, tokenizer_dir=tok_dir, resume=cfg.resume)


def summary(name: str, result: TrainResult) -> int:
    """The command's closing line (steps, tokens, time, loss, bits per byte) and its exit status."""
    ev = result.last_eval
    bpb = f", val bpb {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
    print(
        f"{name}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds / 60:.1f} min, "
        f"loss {result.final_loss:.3f}{bpb} -> {result.model_dir}"
    )
    return 130 if result.interrupted else 0


def run(cfg: PretrainConfig) -> int:
    return summary("pretrain", run_pretrain(cfg))

"""`tinychat <command>`: a thin dispatcher.

Each command is a (config dataclass, function) pair living in the module that does the work; the CLI
only finds it, parses flags with the one config system (tinychat.config) and calls it. Modules are
imported lazily so `tinychat --help` answers at once, without importing torch.
"""

from __future__ import annotations

import importlib
import sys

from tinychat.config import help_text, parse_args
from tinychat.errors import UserError
from tinychat.extras import missing_extra_message

# command words -> ("module", "ConfigClass", "function", "one-line description")
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "speedrun": ("tinychat.speedrun", "SpeedrunConfig", "run", "the whole pipeline on the built-in world"),
    "data prepare": ("tinychat.data.prepare", "PrepareConfig", "run", "clean, filter, dedup and PII-scrub a corpus"),
    "data tokenize": ("tinychat.data.tokenize", "TokenizeConfig", "run", "tokenize a corpus into memmap token shards"),
    "data convert": (
        "tinychat.data.convert",
        "ConvertConfig",
        "run",
        "alpaca / sharegpt / oasst / dolly instruction data into chat rows",
    ),
    "data self-instruct": (
        "tinychat.data.self_instruct",
        "SelfInstructConfig",
        "run",
        "grow instructions and answers from seed tasks with a chat model",
    ),
    "tokenizer train": ("tinychat.tokenizer.train", "TokenizerTrainConfig", "run", "train a byte-level BPE tokenizer"),
    "tokenizer extend": (
        "tinychat.tokenizer.extend",
        "TokenizerExtendConfig",
        "run",
        "append new BPE tokens learned from a new corpus (old ids unchanged)",
    ),
    "model init": (
        "tinychat.model.cli",
        "ModelInitConfig",
        "run_init",
        "create a randomly initialised model directory",
    ),
    "model info": ("tinychat.model.cli", "ModelInfoConfig", "run_info", "print a model directory's size and FLOPs"),
    "model resize-vocab": (
        "tinychat.model.resize",
        "ResizeVocabConfig",
        "run",
        "grow a model's embeddings and output layer to an extended tokenizer",
    ),
    "extend-context": (
        "tinychat.model.extend",
        "ExtendContextConfig",
        "run",
        "raise a model's context window by RoPE scaling (linear, ntk, yarn)",
    ),
    "pretrain": ("tinychat.train.pretrain", "PretrainConfig", "run", "pretrain a model on token shards"),
    "copy-drills": (
        "tinychat.train.copy_drills",
        "CopyDrillsConfig",
        "run",
        "train a fresh model to copy from its context (the stage before pretraining)",
    ),
    "sft": ("tinychat.train.sft", "SFTConfig", "run", "supervised fine-tuning on chat conversations"),
    "reward": ("tinychat.train.reward", "RewardConfig", "run", "train a reward model on preference pairs"),
    "dpo": ("tinychat.train.dpo", "DPOConfig", "run", "direct preference optimisation against a frozen reference"),
    "ppo": ("tinychat.train.ppo", "PPOConfig", "run", "RLHF with PPO: reward model, KL penalty, value head"),
    "grpo": ("tinychat.train.grpo", "GRPOConfig", "run", "RL on verifiable rewards with group baselines"),
    "scaling": (
        "tinychat.train.scaling",
        "ScalingConfig",
        "run",
        "sweep model sizes x token budgets, fit L(N, D), predict and run a larger model",
    ),
    "distill": ("tinychat.train.distill", "DistillConfig", "run", "distil a teacher model into a smaller student"),
    "export gguf": (
        "tinychat.model.gguf_export",
        "GGUFExportConfig",
        "run",
        "write a model as one GGUF file for llama.cpp",
    ),
    "merge": ("tinychat.train.merge", "MergeConfig", "run", "merge a LoRA adapter into its base model"),
    "quantize": (
        "tinychat.model.compress.quant",
        "QuantizeConfig",
        "run",
        "int8 / int4 weight-only quantization of a model directory",
    ),
    "prune": (
        "tinychat.model.compress.prune",
        "PruneConfig",
        "run",
        "magnitude, attention-head or MLP-channel pruning of a model directory",
    ),
    "factorize": (
        "tinychat.model.compress.factorize",
        "FactorizeConfig",
        "run",
        "low-rank (SVD) factorisation of every block Linear",
    ),
    "generate": ("tinychat.infer.cli", "GenerateConfig", "run", "generate text from a model directory"),
    "world generate": ("tinychat.world.generate", "WorldConfig", "run", "write the built-in synthetic world"),
    "world drills": (
        "tinychat.world.drills",
        "DrillsConfig",
        "run",
        "pure drill rows (arithmetic, calculator calls, reading) for a stage between pretraining and SFT",
    ),
    "world passkey": ("tinychat.world.passkey", "PasskeyDataConfig", "run", "write passkey-retrieval training text"),
    "serve": ("tinychat.serve.cli", "ServeConfig", "run", "OpenAI-compatible API server and web chat for a model"),
    "chat": ("tinychat.serve.terminal", "ChatConfig", "run", "chat with a model in the terminal, streamed"),
    "eval": ("tinychat.eval.run", "EvalConfig", "run", "bits per byte, tinyworld suites and lm-eval tasks for a model"),
    "report": ("tinychat.eval.report", "ReportConfig", "run", "re-render a run's report card (report.md + plots)"),
    "rag ingest": ("tinychat.rag.cli", "IngestConfig", "ingest", "add or sync documents into a knowledge base"),
    "rag ask": ("tinychat.rag.cli", "AskConfig", "ask", "answer a question from a knowledge base, with sources"),
    "rag query": ("tinychat.rag.cli", "QueryConfig", "query", "show the chunks retrieved for a question, with scores"),
    "rag list": ("tinychat.rag.cli", "ListConfig", "list_docs", "list a knowledge base's documents"),
    "rag remove": ("tinychat.rag.cli", "RemoveConfig", "remove", "remove documents from a knowledge base"),
    "rag eval": (
        "tinychat.rag.evaluate",
        "RagEvalConfig",
        "run",
        "retrieval recall/MRR and answer accuracy on tinyworld",
    ),
    "agent": ("tinychat.agent.cli", "AgentConfig", "run", "run a tool-using agent on a task (OpenAI tool calling)"),
    "agent eval": (
        "tinychat.agent.evaluate",
        "AgentEvalConfig",
        "run",
        "agent success on tinyworld tasks, tools vs none",
    ),
    "mcp-serve": ("tinychat.agent.mcp", "McpServeConfig", "run", "serve tinychat's built-in tools over MCP (stdio)"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: tinychat <command> [options]   (tinychat <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {entry[3]}" for name, entry in COMMANDS.items()]
    return "\n".join(lines)


# Preset tables of speedrun stages that run an existing command under another name: `drill` is `tinychat sft`
# on the run's drill rows and `anneal` is `tinychat pretrain` continued from the drilled model (tinychat.speedrun).
STAGE_SECTIONS = ("drill", "anneal")


def preset_sections() -> set[str]:
    """Every table a preset may hold for one command or stage; a command skips the others'."""
    return {c.replace(" ", "_") for c in COMMANDS} | set(STAGE_SECTIONS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m tinychat.cli -- pretrain --run x` keeps torchrun off our flags
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = None
    for n_words in (2, 1):
        cand = " ".join(argv[:n_words])
        if cand in COMMANDS:
            name, rest = cand, argv[n_words:]
            break
    if name is None:
        groups = sorted({c.split()[0] for c in COMMANDS if c.split()[0] == argv[0]})
        if groups:
            subs = [c for c in COMMANDS if c.startswith(argv[0] + " ")]
            print(f"error: '{' '.join(argv[:2])}' is not a command; try one of: {', '.join(subs)}.", file=sys.stderr)
        else:
            print(f"error: unknown command '{argv[0]}'; run 'tinychat --help' for the list.", file=sys.stderr)
        return 2
    module_name, cfg_name, fn_name, desc = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        cfg_cls, fn = getattr(module, cfg_name), getattr(module, fn_name)
        if "-h" in rest or "--help" in rest:
            print(f"tinychat {name}: {desc}\n\noptions:\n{help_text(cfg_cls)}")
            return 0
        cfg = parse_args(cfg_cls, rest, section=name.replace(" ", "_"), sections=preset_sections())
        result = fn(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a package of an extra that is not installed: say which pip command
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

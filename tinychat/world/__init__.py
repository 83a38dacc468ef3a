"""tinyworld: the built-in synthetic, bilingual (English / Simplified Chinese) world.

Every split the pipeline needs, generated deterministically from a seed: pretraining text, SFT chats,
preference pairs, RL prompts, a knowledge base, and held-out eval sets (docs/world.md).

    from tinychat.world import generate_world, load_eval, check
    m = generate_world("runs/x/world", seed=0, size="small")
    rows = load_eval(m.root, "facts_heldout")
    ok = check(model_reply, rows[0])
"""

from tinychat.world.answers import check, extract_answer, is_refusal, normalize, reward
from tinychat.world.arith import CALCULATOR_TOOL
from tinychat.world.evalsets import SEARCH_TOOL, SKILLS
from tinychat.world.generate import Manifest, WorldConfig, build_files, ensure_world, generate_world, load_manifest
from tinychat.world.load import chinese_words, few_shot, load_eval, load_jsonl, load_world
from tinychat.world.sizes import SIZES

__all__ = [
    "CALCULATOR_TOOL",
    "SEARCH_TOOL",
    "SIZES",
    "SKILLS",
    "Manifest",
    "WorldConfig",
    "build_files",
    "check",
    "chinese_words",
    "ensure_world",
    "extract_answer",
    "few_shot",
    "generate_world",
    "is_refusal",
    "load_eval",
    "load_jsonl",
    "load_manifest",
    "load_world",
    "normalize",
    "reward",
]

"""Does a trained model copy from its context in text? Greedy completion of the world's copy drills.

    .venv/bin/python bench/copy_probe.py MODEL_DIR [MODEL_DIR ...] [--n 200] [--seed 7]

Each probe is one of tinychat.world.copying's drills ("Write down Nysdor, 90412, 383 * 42. Once more: ...")
cut just before its second list; the model completes it greedily and the probe counts the completions
that start with the list exactly, and the share of its items reproduced in place. Items are names of
the world's known entities, random numbers and expressions, so a model that has not learned to copy
cannot guess them: this is the skill the calculator call (the question's numbers), the knowledge-base
answer (the document's value) and the agent (a tool's result) need. Prints each model's rates with 95%
Wilson intervals. Drills are drawn with their own seed, so these exact strings are not in the speedrun's
text (which has no drills by default).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

from tinychat.infer.generate import generate
from tinychat.infer.sampling import SamplingParams
from tinychat.model import Model
from tinychat.tokenizer import Tokenizer
from tinychat.world import copying


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def probes(world_dir: Path, n: int, seed: int) -> list[tuple[str, list[str], str]]:
    """(prompt, items, separator) per drill: the text up to its second list."""
    world = json.loads((world_dir / "world.json").read_text())
    ents = world["entities"] if isinstance(world["entities"], list) else list(world["entities"].values())
    known = [e for e in ents if e.get("group") in ("trained", "heldout")]
    rng, out = random.Random(seed), []
    for i in range(n):
        lang = "en" if i % 2 == 0 else "zh"
        names = [e["name"][lang] for e in known]
        text = copying.drill(rng, names, lang, set())
        sep = ", " if lang == "en" else "、"
        for template in copying.TEMPLATES[lang]:  # find the list: the text between the template's pieces
            head, mid, _tail = template.split("{a}")
            if text.startswith(head) and mid in text:
                listed = text[len(head) : text.index(mid, len(head))]
                second = len(head) + len(listed) + len(mid)
                if text[second:].startswith(listed):
                    out.append((text[:second], listed.split(sep), sep))
                    break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--world", default="", help="world directory (default: the first model's run)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    world = Path(args.world) if args.world else Path(args.models[0]).parents[1] / "world"
    cases = probes(world, args.n, args.seed)
    print(f"{len(cases)} copy probes from {world} (seed {args.seed}); e.g. {cases[0][0]!r}")
    for path in args.models:
        model = Model.from_pretrained(path, dtype=torch.float32).eval()
        tok = Tokenizer.from_pretrained(path)
        params = SamplingParams(temperature=0.0, max_new_tokens=48, seed=0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = generate(model, tok, [p for p, _, _ in cases], params)
        exact = items_right = items = 0
        for (_, listed, sep), out in zip(cases, outs):
            exact += out.text.startswith(sep.join(listed))
            got = out.text.split(sep)
            items_right += sum(a == b.strip(" .。\n") for a, b in zip(listed, got))
            items += len(listed)
        lo, hi = wilson(exact, len(cases))
        ilo, ihi = wilson(items_right, items)
        print(
            f"{path}: whole list {exact / len(cases):.1%} [{lo:.1%}-{hi:.1%}], "
            f"items in place {items_right / items:.1%} [{ilo:.1%}-{ihi:.1%}]; e.g. {outs[0].text[:60]!r}"
        )


if __name__ == "__main__":
    main()

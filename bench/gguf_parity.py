"""How closely llama.cpp runs tinychat's GGUF export of a model: tokens, logits, greedy text, top-1 agreement.

    .venv/bin/python bench/gguf_parity.py --model runs/s4/checkpoints/pretrain [--data runs/s4/data/tokens]

Exports the model as f16, q8_0 and q4_0, opens each file with llama.cpp (llama-cpp-python), and compares
on held-out text (the validation split of a tokenized directory): llama.cpp's tokenization of the decoded
text against tinychat's ids, the largest logit difference against tinychat in fp32 (for f16 also against
tinychat with the same f16-rounded weights), greedy continuations of a few prompts, and the share of
positions whose most likely next token agrees. Accuracy, not speed: safe to run on a busy machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from tinychat.data.shards import TokenIndex
from tinychat.infer.generate import generate_ids
from tinychat.infer.sampling import SamplingParams
from tinychat.model import Model
from tinychat.model.gguf_export import export_gguf
from tinychat.tokenizer import Tokenizer


def documents(data: Path, n: int, max_len: int) -> list[list[int]]:
    """The first n validation documents (end-of-text removed), cut to max_len tokens."""
    index = TokenIndex.load(data)
    split = "val" if "val" in index.splits else "train"
    stream = np.concatenate(index.memmaps(split)).astype(np.int64)
    ends = np.flatnonzero(stream == index.eot_id)
    starts = np.r_[0, ends[:-1] + 1]
    docs = [stream[s:e].tolist()[:max_len] for s, e in zip(starts, ends) if e - s >= 8]
    return docs[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="", help="tokenized directory (default: the model's run data/tokens)")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--greedy", type=int, default=64, help="greedy tokens per prompt")
    args = ap.parse_args()
    import llama_cpp

    model_dir = Path(args.model)
    data = Path(args.data) if args.data else model_dir.parents[1] / "data" / "tokens"
    tok = Tokenizer.from_pretrained(model_dir)
    fp32 = Model.from_pretrained(str(model_dir), dtype=torch.float32)
    f16w = Model.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in f16w.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    ctx = fp32.cfg.max_seq_len
    docs = documents(data, args.docs, ctx)
    texts = [tok.decode(d) for d in docs]
    ours_ids = [tok.encode(t) for t in texts]
    with torch.no_grad():
        ours = [fp32(torch.tensor([d]))[0] for d in ours_ids]
        ours16 = [f16w(torch.tensor([d]))[0] for d in ours_ids]
    prompts = [d[:8] for d in ours_ids[:5]]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.greedy, stop_on_eos=False)
    greedy32 = generate_ids(fp32, prompts, params)[0]
    greedy16 = generate_ids(f16w, prompts, params)[0]
    print(f"{model_dir}: {fp32.cfg.arch}, {fp32.num_params() / 1e6:.2f}M parameters; {len(docs)} documents, "
          f"{sum(map(len, ours_ids))} positions; greedy: {len(prompts)} prompts x {args.greedy} tokens")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f16", "q8_0", "q4_0"):
            path = Path(tmp) / f"m-{kind}.gguf"
            info = export_gguf(model_dir, path, kind)
            llm = llama_cpp.Llama(str(path), n_ctx=ctx, logits_all=True, n_threads=2, verbose=False, seed=0)
            same_tok = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == i for t, i in zip(texts, ours_ids))
            diff32 = diff16 = 0.0
            agree = total = 0
            for ids, o32, o16 in zip(ours_ids, ours, ours16):
                llm.reset()
                llm.eval(ids)
                theirs = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
                diff32 = max(diff32, (theirs - o32).abs().max().item())
                diff16 = max(diff16, (theirs - o16).abs().max().item())
                agree += int((theirs.argmax(-1) == o32.argmax(-1)).sum())
                total += len(ids)
            same_greedy = []
            for p, g32, g16 in zip(prompts, greedy32, greedy16):
                out = []
                for t in llm.generate(p, temp=0.0, top_k=1, reset=True):
                    out.append(t)
                    if len(out) == args.greedy:
                        break
                same_greedy.append((out == g32, out == g16))
            print(
                f"  {kind:<5} {info['bytes'] / 2**20:6.1f} MiB | tokenization equal {same_tok}/{len(texts)} | "
                f"max |logit diff| vs fp32 {diff32:.4f}, vs f16 weights {diff16:.4f} | top-1 agreement "
                f"{agree / total:.2%} | greedy equal to fp32 {sum(a for a, _ in same_greedy)}/{len(prompts)}, "
                f"to f16 weights {sum(b for _, b in same_greedy)}/{len(prompts)}"
            )


if __name__ == "__main__":
    main()

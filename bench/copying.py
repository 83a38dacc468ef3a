"""Does the model learn to copy from its context at all? Pure copy drills, no other data.

    .venv/bin/python bench/copying.py [--preset tiny] [--vocab 512] [--alphabet N] [--steps 1500]
        [--lr 3e-3] [--no-qk-norm] [--model-vocab 8192] [--layers N] [--fp32] [--clip 1.0] [--untied]
        [--emb-std S] [--drill-softmax]
        [--prev-token-init | --mimetic STD [--ov-scale C] | --induction-init WRITE MATCH COPY GAIN [--freeze-circuit]]

Why: the speedrun model never copies a name or number from its prompt (tool calls carry the wrong
numbers, answers from retrieved documents are 0%; docs/speedrun.md). Copying needs an induction circuit
(a previous-token head feeding a head that matches the current token's earlier occurrence; Olsson et
al. 2022), and this bench measures how many optimizer steps the model needs to form one on the easiest
data there is: every window is drills `<eos> x1 .. xn <sep> x1 .. xn` with n in [5, 30) and xi drawn
uniformly from --vocab ids, packed into --batch x --seq windows like pretraining. Half the tokens are
predictable by copying; a model that copies drives their accuracy towards 1 and the loss towards half
of ln(vocab). The optimizer is tinychat's (fused AdamW, no decay on gains), warm-up 50 steps, then
constant; bf16 autocast as in training. Prints loss and copy accuracy every --every steps.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from tinychat.model import Model, preset
from tinychat.model.transformer import rope_inv_freq
from tinychat.train.config import TrainConfig
from tinychat.train.optim import build_optimizer

EOS, SEP, FIRST = 1, 2, 100  # drill ids start at FIRST so the two markers never occur inside a drill


def drills(rng: np.random.Generator, n_tokens: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, copyable) of length n_tokens: copyable[t] is True where token t repeats the drill's first half."""
    toks: list[int] = []
    copy: list[bool] = []
    while len(toks) < n_tokens:
        xs = rng.choice(ids, size=int(rng.integers(5, 30))).tolist()
        toks += [EOS, *xs, SEP, *xs]
        copy += [False] * (len(xs) + 2) + [True] * len(xs)
    return np.array(toks[:n_tokens]), np.array(copy[:n_tokens])


def batch(
    rng: np.random.Generator, b: int, t: int, vocab: int, alphabet: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, whether y is a copy, and the batch's drill ids: the first `vocab` ids, or with `alphabet` a fresh
    draw of `vocab` of the first `alphabet` ids for every batch (so no id is special to the circuit)."""
    ids = FIRST + (rng.choice(alphabet, size=vocab, replace=False) if alphabet else np.arange(vocab))
    toks, copy = drills(rng, b * (t + 1), ids)
    w, c = torch.from_numpy(toks.reshape(b, t + 1)), torch.from_numpy(copy.reshape(b, t + 1))
    return w[:, :-1], w[:, 1:], c[:, 1:], torch.from_numpy(ids)


@torch.no_grad()
def previous_token_head(model: Model, scale: float = 4.0) -> None:
    """Make layer 0's query head 0 (and its key/value head 0) attend to the previous position, by weights only.

    Queries and keys of that head become constants (zero weights, biases b_q and b_k); RoPE rotates them by
    position, so q_i . k_j = sum over frequency pairs of b_q^T R(j - i) b_k. With b_q = R(+1) b_k every pair's
    term peaks together at j = i - 1, so the head looks one token back whatever the tokens are: half of an
    induction circuit, present from step 0 instead of learned. It is only an initialisation of Qwen2's
    layout, so the model still saves and loads as a Hugging Face checkpoint.
    """
    cfg = model.cfg
    attn = model.model.layers[0].self_attn
    hd, half = cfg.head_dim, cfg.head_dim // 2
    theta = rope_inv_freq(cfg)  # (hd/2,): pair (d, d + hd/2) turns by theta[d] per position
    k = torch.zeros(hd)
    k[:half] = scale  # every pair at angle 0
    # q . k over a gap of j - i positions is scale^2 * sum_d cos(theta_d * (1 + j - i)): all peak at j = i - 1
    q = torch.cat([scale * torch.cos(theta), -scale * torch.sin(theta)])
    attn.q_proj.weight[:hd] = 0.0
    attn.q_proj.bias[:hd] = q
    attn.k_proj.weight[:hd] = 0.0
    attn.k_proj.bias[:hd] = k


@torch.no_grad()
def mimetic_init(model: Model, qk_std: float = 0.05, ov_scale: float = 1.0) -> None:
    """Mimetic initialisation (Trockman & Kolter 2023): every head starts with W_q^T W_k and W_v W_o close to
    a (projection onto a random subspace of the) identity, the structure trained attention layers show.

    W_q = W_k makes a head attend to positions whose token resembles its own (in the slowly rotating RoPE
    pairs; the fast pairs add a local bias), and W_o = W_v^T makes it pass the attended token's identity on
    unchanged: the two halves of a copy circuit as a starting point, instead of random maps. Weights only,
    so any Hugging Face layout holds it. With grouped-query attention the q heads of a group share the
    group's key map.
    """
    cfg = model.cfg
    hd, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    for layer in model.model.layers:
        attn = layer.self_attn
        for kv in range(cfg.n_kv_head):
            w = torch.randn(hd, cfg.d_model) * qk_std  # (hd, d): the shared query/key map of this group
            attn.k_proj.weight[kv * hd : (kv + 1) * hd] = w
            for g in range(group):
                h = kv * group + g
                attn.q_proj.weight[h * hd : (h + 1) * hd] = w
            v = attn.v_proj.weight[kv * hd : (kv + 1) * hd]  # (hd, d)
            for g in range(group):
                h = kv * group + g
                # o_proj maps head h's hd values back to d: W_o[:, head] = c * W_v^T, so W_o W_v = c * W_v^T W_v
                attn.o_proj.weight[:, h * hd : (h + 1) * hd] = ov_scale * v.T / (v.norm(dim=1).pow(2).mean())


def _orthonormal_rows(n: int, d: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(n, d) orthonormal rows, orthogonal to the rows of `exclude` (m, d) when given."""
    a = torch.randn(d, n)
    if exclude is not None:
        a = a - exclude.T @ (exclude @ a)
    q, _ = torch.linalg.qr(a)
    return q.T.contiguous()


@torch.no_grad()
def induction_init(
    model: Model, write: float = 1.0, match: float = 1.0, copy: float = 1.0, slow: int = 10, gain: float = 1.0
) -> None:
    """Wire a whole induction circuit (Olsson et al. 2022) into layers 0 and 1 by weights (Qwen2 layout).

    Layer 0, head 0 attends to the previous token (previous_token_head) and writes a projection
    R_v e_prev of that token into a subspace U of the residual stream kept apart from R_v's rows. Layer 1,
    head 0's query reads the current token (R e_cur) and its key reads what layer 0 wrote (R e_prev), so it
    attends where the previous token equals the current one, i.e. to the token after the earlier
    occurrence, and its value/output pass that token's embedding (projected) to the output, which the tied
    head reads as that token's logit. Query and key live only in the `slow` most slowly rotating RoPE pairs
    so the match does not depend on distance. `write`, `match` and `copy` scale the three parts.
    """
    cfg = model.cfg
    hd, half, d = cfg.head_dim, cfg.head_dim // 2, cfg.d_model
    previous_token_head(model, scale=8.0)
    slow_dims = torch.cat([torch.arange(half - slow, half), torch.arange(hd - slow, hd)])  # (2*slow,)
    r = _orthonormal_rows(2 * slow, d)  # (2s, d): the matching subspace
    rv = torch.cat([r, _orthonormal_rows(hd - 2 * slow, d, exclude=r)])  # (hd, d): layer 0's value map, contains r
    u = _orthonormal_rows(hd, d, exclude=rv).T  # (d, hd): where layer 0 writes, apart from rv's rows
    emb_rms = model.model.embed_tokens.weight.pow(2).mean().sqrt()  # the embeddings' scale
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    a0.v_proj.weight[:hd] = rv
    a0.o_proj.weight[:, :hd] = write * emb_rms * u  # the written copy is as large as an embedding, times `write`
    a0.o_proj.weight[:, hd : 2 * hd] = 0.0  # head 1 shares the value map: keep its output out of the way
    # layer 1 head 0: q = R n (current token), k = R rv^T u^T n (what layer 0 wrote), in the slow pairs only
    a1.q_proj.weight[:hd] = 0.0
    a1.k_proj.weight[:hd] = 0.0
    a1.q_proj.weight[slow_dims] = match * r
    a1.k_proj.weight[slow_dims] = match * r @ rv.T @ u.T
    a1.k_proj.bias[:hd] = 0.0
    a1.q_proj.bias[:hd] = 0.0
    # value: the attended token's embedding, projected on rv; output: back along rv, so logits = e_v . rv^T rv e_j
    a1.v_proj.weight[:hd] = rv
    a1.o_proj.weight[:, :hd] = copy * rv.T
    a1.o_proj.weight[:, hd : 2 * hd] = 0.0
    model.model.norm.weight.fill_(gain)  # the tied head's logits are bounded by |norm(h)| |e|: room to be sure


def freeze_circuit(model: Model) -> None:
    """Zero the gradients of the wired circuit's rows and columns (layers 0 and 1, head 0 and kv head 0), so
    training may change everything else (embeddings included) but not the circuit's maps."""
    hd = model.cfg.head_dim

    def rows(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:hd] = 0
        return g

    def cols(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[:, : 2 * hd] = 0
        return g

    for i in (0, 1):
        a = model.model.layers[i].self_attn
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight.register_hook(rows)
            lin.bias.register_hook(rows)
        a.o_proj.weight.register_hook(cols)
    model.model.norm.weight.requires_grad_(False)


def drill_softmax_loss(model: Model, x: torch.Tensor, y: torch.Tensor, drill_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the softmax over [EOS, SEP, drill ids] only: the rows of the (tied) head for the
    other ~8,100 tokens are neither multiplied nor pushed down, which is what the full softmax spends its
    drill-token gradient on (the embeddings' shared component grows; docs/speedrun.md, round 5)."""
    ids = torch.cat([torch.tensor([EOS, SEP]), drill_ids])  # (K,)
    remap = torch.full((model.cfg.vocab_size,), -100, dtype=torch.long)
    remap[ids] = torch.arange(len(ids))
    h = model.hidden_states(x)  # (B, T, d)
    logits = h @ model.lm_head.weight[ids].T  # (B, T, K)
    return F.cross_entropy(logits.float().flatten(0, 1), remap[y].flatten())


@torch.no_grad()
def copy_accuracy(model: Model, rng: np.random.Generator, args: argparse.Namespace) -> float:
    model.eval()
    x, y, c, ids = batch(rng, 32, args.seq, args.vocab, args.alphabet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    if args.drill_softmax:  # the argmax among the ids the loss ranked (the others were never pushed down)
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[ids] = True
        logits[..., ~keep] = float("-inf")
    pred = logits.argmax(-1)
    model.train()
    return float((pred[c] == y[c]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=512, help="distinct drill tokens (the model's vocabulary is 8192)")
    ap.add_argument("--alphabet", type=int, default=0, help="draw each batch's --vocab drill ids from this many")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--decay", type=float, default=0.1, help="AdamW weight decay (the speedrun's: 0.1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--model-vocab", type=int, default=8192, help="the model's vocabulary (the output layer's cost)")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's number of layers")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    ap.add_argument("--no-qk-norm", action="store_true", help="Llama-style attention (no RMSNorm on q and k)")
    ap.add_argument(
        "--prev-token-init",
        action="store_true",
        help="Qwen2-style attention (q/k biases, no QK-norm); layer 0's first head starts on the previous token",
    )
    ap.add_argument("--mimetic", type=float, default=0.0, help="mimetic initialisation with this q/k std (0 = off)")
    ap.add_argument("--ov-scale", type=float, default=1.0, help="with --mimetic: W_o W_v = scale * W_v^T W_v / |w_v|^2")
    ap.add_argument("--induction-init", nargs=4, type=float, metavar=("WRITE", "MATCH", "COPY", "GAIN"), default=None)
    ap.add_argument("--freeze-circuit", action="store_true", help="with --induction-init: train around the circuit")
    ap.add_argument("--untied", action="store_true", help="separate input embedding and output head")
    ap.add_argument("--emb-std", type=float, default=0.0, help="input embedding init std (0 = preset)")
    ap.add_argument(
        "--drill-softmax",
        action="store_true",
        help="the loss's softmax over the drill ids and the two markers only (the head's other rows get no gradient)",
    )
    ap.add_argument("--init", default="", help="start from this trained model directory (e.g. a speedrun's pretrain)")
    args = ap.parse_args()
    torch.manual_seed(0)
    depth = {"n_layer": args.layers} if args.layers else {}
    if args.untied:
        depth["tie_embeddings"] = False
    if args.init:
        model = Model.from_pretrained(args.init, dtype=torch.float32)
    elif args.induction_init:
        model = Model(preset(args.preset, vocab_size=args.model_vocab, qk_norm=False, qkv_bias=True, **depth))
        w, m, c, g = args.induction_init
        induction_init(model, w, m, c, gain=g)
        if args.freeze_circuit:
            freeze_circuit(model)
    elif args.prev_token_init:
        model = Model(preset(args.preset, vocab_size=args.model_vocab, qk_norm=False, qkv_bias=True, **depth))
        previous_token_head(model)
    else:
        model = Model(preset(args.preset, vocab_size=args.model_vocab, qk_norm=not args.no_qk_norm, **depth))
    if args.emb_std:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, args.emb_std)
    if args.mimetic:
        mimetic_init(model, args.mimetic, args.ov_scale)
    opt = build_optimizer(model, TrainConfig(lr=args.lr, weight_decay=args.decay), torch.device("cpu"))
    rng, eval_rng = np.random.default_rng(0), np.random.default_rng(1)
    inits = [("induction", args.induction_init), ("previous-token", args.prev_token_init), ("mimetic", args.mimetic)]
    init_name = args.init or next((n for n, on in inits if on), "default")
    print(
        f"{args.preset} ({model.num_params() / 1e6:.1f}M, {model.cfg.n_layer} layers), qk_norm {model.cfg.qk_norm}, "
        f"init {init_name}, "
        f"{args.vocab} drill tokens, "
        f"lr {args.lr}, {args.batch}x{args.seq}; ln(vocab)/2 = {math.log(args.vocab) / 2:.2f} is a copier's loss"
    )
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        x, y, _, ids = batch(rng, args.batch, args.seq, args.vocab, args.alphabet)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            if args.drill_softmax:
                loss = drill_softmax_loss(model, x, y, ids)
            else:
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0:
            acc = copy_accuracy(model, eval_rng, args)
            e = model.model.embed_tokens.weight[FIRST : FIRST + args.vocab].float()
            common, spread = e.mean(0).norm().item(), (e - e.mean(0)).norm(dim=1).mean().item()
            print(
                f"step {step:>5}  loss {loss.item():.3f}  copy accuracy {acc:.3f}  "
                f"embedding common {common:.3f} / per-token {spread:.3f}  ({time.perf_counter() - t0:.0f}s)"
            )


if __name__ == "__main__":
    main()

"""An adapter so EleutherAI's lm-evaluation-harness can evaluate a tinychat model directory.

    lm-eval's three request types, implemented once here on plain Python values (testable without lm-eval):
      loglikelihood(context, continuation) -> (log p(continuation | context), is it the greedy continuation)
      loglikelihood_rolling(text)          -> log p(text), scored in disjoint windows of the context length
      generate_until(context, gen_kwargs)  -> greedy text until a stop string or max_gen_toks

With lm-eval installed (`pip install tinychat[eval]`) importing this module registers the model type
"tinychat", so `lm_eval.simple_evaluate(model="tinychat", model_args="pretrained=DIR", ...)` works, and
`tinychat eval --model DIR --harness-tasks TASK ...` runs harness tasks next to the tinyworld suites.

Tokenisation follows lm-eval's Hugging Face model: trailing spaces of a context move to the
continuation, the continuation's ids are those of encode(context + continuation) past encode(context),
an empty context is replaced by the end-of-text token, and inputs are cut from the left to the context
window. Text is encoded as text (special-token look-alikes stay text) unless lm-eval asked for the chat
template, whose markers must become the real special tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, targets) pairs covering `tokens` once; each window's input fits in max_len tokens.

    The first window is conditioned on `prefix` alone; later ones on as many preceding tokens as fit
    (lm-eval's get_rolling_token_windows with context_len=1 followed by make_disjoint_window).
    """
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        window = tokens[end - max_len - 1 : end - 1]
        yield window[: len(window) - (n - 1)], tokens[end - n : end]
        done = end


class HarnessModel:
    """Log-likelihoods and greedy generation over a tinychat Model + Tokenizer, batched."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 16,
        max_length: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length or model.cfg.max_seq_len)
        self.precision = precision
        self.structural = False  # True once lm-eval renders the chat template (see module docstring)
        self._structural_backend: Any = None
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        if not self.structural:
            return self.tok.encode(text)
        if self._structural_backend is None:
            import tokenizers

            self._structural_backend = tokenizers.Tokenizer.from_str(self.tok.backend.to_str())
            self._structural_backend.encode_special_tokens = False
        return self._structural_backend.encode(text, add_special_tokens=False).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.tok.eot_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx) :]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(target tokens), all targets greedy) per (context ids, target ids) pair."""
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            inputs, n_cont = [], []
            for i in idx:
                ctx, cont = pairs[i]
                assert cont, "a continuation must have at least one token"
                full = (list(ctx) + list(cont))[-(self.max_length + 1) :]
                inputs.append(full[:-1])
                n_cont.append(min(len(cont), len(full) - 1))
            T = max(len(x) for x in inputs)
            x = torch.zeros(len(idx), T, dtype=torch.long, device=self.device)
            for r, inp in enumerate(inputs):
                x[r, : len(inp)] = torch.tensor(inp, device=self.device)
            with self._autocast():
                logits = self.model(x)
            logp = F.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                L, n = len(inputs[r]), n_cont[r]
                target = torch.tensor(pairs[i][1][-n:], device=self.device)
                rows = logp[r, L - n : L]  # (n, V): positions that predict the continuation
                ll = rows.gather(1, target[:, None]).sum().item()
                greedy = bool((rows.argmax(-1) == target).all())
                out[i] = (ll, greedy)
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, requests: Sequence[tuple[str] | str]) -> list[float]:
        pairs, owner = [], []
        for k, req in enumerate(requests):
            text = req if isinstance(req, str) else req[0]
            for w in rolling_windows(self.encode(text), self.tok.eot_id, self.max_length):
                pairs.append(w)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self.score(pairs)):
            totals[k] += ll
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        from tinychat.infer.generate import generate
        from tinychat.infer.sampling import SamplingParams

        out = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (_, kw) in enumerate(requests):
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            key = (tuple(until), int(kw.get("max_gen_toks", 256)), temp)
            groups.setdefault(key, []).append(i)
        for (until, max_gen, temp), idx in groups.items():
            max_new = max(1, min(max_gen, self.max_length - 1))
            prompts = []
            for i in idx:
                ids = self.encode(requests[i][0]) or [self.tok.eot_id]
                prompts.append(ids[-(self.max_length - max_new) :])
            params = SamplingParams(temperature=temp, max_new_tokens=max_new, stop=[u for u in until if u], seed=0)
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b : b + self.batch_size]
                with torch.no_grad(), self._autocast():
                    gens = generate(self.model, self.tok, prompts[b : b + self.batch_size], params)
                for i, g in zip(chunk, gens):
                    out[i] = g.text
        return out


def _register() -> type | None:
    """Define and register the lm-eval model class "tinychat" when lm-eval is installed."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        return None

    class TinychatLM(LM):
        """lm-eval's view of a tinychat model directory: `model_args="pretrained=DIR,batch_size=16"`."""

        def __init__(
            self,
            pretrained: str,
            batch_size: int | str = 16,
            device: str = "cpu",
            max_length: int | None = None,
            precision: str = "fp32",
            **_: Any,
        ) -> None:
            from tinychat.eval.backend import load

            super().__init__()
            model, tok = load(pretrained, device=device or "cpu")
            bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
            self.core = HarnessModel(model, tok, bs, int(max_length) if max_length else None, precision)
            self._name = str(pretrained)

        @classmethod
        def from_core(cls, core: HarnessModel, name: str) -> TinychatLM:
            """Wrap an already loaded model (tinychat eval loads it once for every suite)."""
            obj = cls.__new__(cls)
            LM.__init__(obj)
            obj.core, obj._name = core, name
            return obj

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            return self.core.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            return self.core.loglikelihood_rolling([r.args for r in requests])

        def generate_until(self, requests: list[Any]) -> list[str]:
            return self.core.generate_until([r.args for r in requests])

        @property
        def tokenizer_name(self) -> str:
            return self._name

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.core.tok.chat_template or ""

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            self.core.structural = True
            return self.core.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    return register_model("tinychat")(TinychatLM)


TinychatLM = _register()


def lm_eval_available() -> bool:
    return TinychatLM is not None

"""One chat call, two ways: a local model directory, or any OpenAI-compatible endpoint.

Why both: `tinychat rag ask` and `tinychat agent` should run on a laptop with no server (--model DIR)
and, unchanged, drive `tinychat serve` or any other OpenAI-compatible API (--base-url URL). Both backends
take OpenAI-format messages and tool specs and return one assistant message in OpenAI format
({"role", "content", "tool_calls"}), so callers never know which one they talk to.

The local backend renders the chat template itself and parses <tool_call> blocks with the same parser the
server uses (tinychat.infer.tool_calls), so a local run and a served run of one model behave alike.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tinychat.errors import UserError
from tinychat.infer.tool_calls import split_reply

T = TypeVar("T")
R = TypeVar("R")


class ChatBackend(Protocol):
    name: str

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, max_tokens: int = 256
    ) -> dict[str, Any]: ...


class LocalChat:
    """A tinychat (or transformers-saved) model on this machine, greedy decoding."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        import torch

        from tinychat.infer.complete import LocalCompleter
        from tinychat.infer.locate import resolve_model, tokenizer_dir
        from tinychat.model import Model
        from tinychat.model.hub import model_name
        from tinychat.model.packed import pack_linears
        from tinychat.tokenizer import Tokenizer

        path = resolve_model(str(model_dir))
        model = Model.from_pretrained(str(path), dtype=torch.float32, device=device).eval()
        pack_linears(model.fuse_projections())  # loaded to answer only, as `tinychat eval` (eval/run.py)
        tok = Tokenizer.from_pretrained(tokenizer_dir(path))
        self.completer = LocalCompleter(model, tok, batch_size=8)
        self.tokenizer = tok
        self.path = path
        self.name = model_name(path)
        self.max_seq_len = self.completer.max_seq_len

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        return len(self.tokenizer.render_chat(messages, tools, add_generation_prompt=True).ids)

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, max_tokens: int = 256
    ) -> dict[str, Any]:
        ids = self.tokenizer.render_chat(messages, tools or None, add_generation_prompt=True).ids
        return reply_message(self.completer.complete([ids], max_tokens)[0], bool(tools))


def reply_message(text: str, tools: bool) -> dict[str, Any]:
    """The assistant message (OpenAI format) of a local model's reply text: <tool_call> blocks parsed
    when tools were offered."""
    content, calls, _ = split_reply(text) if tools else (text.strip(), [], 0)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [c.to_openai() for c in calls]
    return msg


class Lockstep:
    """LocalChat for many callers at once, each in its own thread: a call waits until every caller still
    at work has asked (or finished), then one batched greedy completion answers all of them.

    Why: an evaluation runs dozens of independent agent loops (tinychat.agent.evaluate). One at a time,
    each model call decodes a single row, and on a CPU a batch of 32 rows costs little more than one.
    The loops stay the shipped, sequential Agent code; only the backend batches. Greedy replies do not
    depend on the batch (tests/infer/test_generate.py), so the results equal a sequential run's.

    `enter()` before a caller starts and `leave()` when it is done (also on error): the batch is run
    as soon as the callers at work all wait."""

    def __init__(self, local: LocalChat, batch_size: int = 32) -> None:
        from tinychat.infer.complete import LocalCompleter  # torch, as in LocalChat

        self.local, self.name = local, local.name
        self.completer = LocalCompleter(local.completer.model, local.tokenizer, batch_size=batch_size)
        self.tokenizer, self.max_seq_len = local.tokenizer, local.max_seq_len
        self._cond = threading.Condition()
        self._working = 0
        self._waiting: list[tuple[list[int], int, dict[str, Any]]] = []  # (prompt ids, max_tokens, slot)
        self.batches: list[int] = []  # rows of each completion run: the batching achieved

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        return self.local.count_tokens(messages, tools)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn(item) for every item, each in its own thread, their chat calls batched; results in order."""
        for _ in items:  # all enter first, so the first call waits for the others
            self.enter()

        def work(item: T) -> R:
            try:
                return fn(item)
            finally:
                self.leave()

        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            return list(pool.map(work, items))

    def enter(self) -> None:
        with self._cond:
            self._working += 1

    def leave(self) -> None:
        with self._cond:
            self._working -= 1
            self._run_if_all_wait()

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, max_tokens: int = 256
    ) -> dict[str, Any]:
        ids = self.tokenizer.render_chat(messages, tools or None, add_generation_prompt=True).ids
        slot: dict[str, Any] = {}
        with self._cond:
            self._waiting.append((ids, max_tokens, slot))
            self._run_if_all_wait()
            while not slot:
                self._cond.wait()
        if "error" in slot:
            raise slot["error"]
        return reply_message(slot["text"], bool(tools))

    def _run_if_all_wait(self) -> None:
        """Called with the lock held: when every caller at work waits, complete them all (grouped by
        max_tokens) and wake them."""
        if not self._waiting or len(self._waiting) < self._working:
            return
        batch, self._waiting = self._waiting, []
        self.batches.append(len(batch))
        try:
            for limit in sorted({m for _, m, _ in batch}):
                group = [(ids, slot) for ids, m, slot in batch if m == limit]
                texts = self.completer.complete([ids for ids, _ in group], limit)
                for (_, slot), text in zip(group, texts):
                    slot["text"] = text
        except Exception as e:  # noqa: BLE001 - every waiting caller gets the error
            for _, _, slot in batch:
                slot.setdefault("error", e)
        self._cond.notify_all()


class RemoteChat:
    """POST /v1/chat/completions on an OpenAI-compatible server (tinychat serve, vLLM, llama.cpp, OpenAI).

    The standard library's HTTP client: one JSON request per call needs nothing more, and the agent stays
    free of an HTTP dependency."""

    def __init__(self, base_url: str, model: str = "", api_key: str = "", timeout: float = 120.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"--base-url must start with http:// or https://, got {base_url!r}.")
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.name = model or self._first_model()

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - the user's own URL
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = e.reason
            raise UserError(f"{self.base_url}{path} answered {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot reach {self.base_url}: {getattr(e, 'reason', e)}.") from None

    def _first_model(self) -> str:
        try:
            return self._request("/models")["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.base_url}/models lists no model; pass --served-model NAME.") from None

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, max_tokens: int = 256
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if tools:
            body["tools"] = tools
        msg = self._request("/chat/completions", body)["choices"][0]["message"]
        out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("tool_calls"):
            out["tool_calls"] = msg["tool_calls"]
        return out

    def sample(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> tuple[str, str]:
        """One sampled reply's text and finish reason ("stop", or "length" when max_tokens cut it)."""
        body: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens}
        body.update(temperature=temperature, top_p=top_p)
        if seed is not None:
            body["seed"] = seed
        choice = self._request("/chat/completions", body)["choices"][0]
        return choice["message"].get("content") or "", choice.get("finish_reason") or "stop"


def make_backend(model: str = "", base_url: str = "", served_model: str = "", api_key: str = "", runs: str = "runs"):  # noqa: ANN201
    """LocalChat for a model directory (default: the speedrun's newest), RemoteChat for a URL."""
    if base_url:
        if model:
            raise UserError("pass either --model DIR or --base-url URL, not both.")
        return RemoteChat(base_url, served_model, api_key)
    from tinychat.infer.locate import resolve_model

    return LocalChat(resolve_model(model, runs))

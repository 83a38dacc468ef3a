"""The engine in a process of its own (`tinychat serve --engine_process`): vLLM v1's split of API server and
engine core.

Why: in one process the HTTP server's thread (parsing, validation, one JSON chunk per streamed token) and the
engine's thread take turns for the interpreter lock. The engine releases it inside every torch operation and
must win it back after each one, so under load every step also waits for HTTP work. Measured on a 2-core CPU
with one kernel thread (docs/engine.md): the engine driven by client threads in its own process generated
238 / 1,464 / 2,065 tokens/s at 1 / 16 / 64 concurrent requests; in a process of its own, 355 / 1,969 / 2,610.
The same split is why vLLM v1 runs its EngineCore in a separate process.

What crosses (two one-way pipes between this process and the child it spawned; pickled tuples, so nothing
that a client or a file supplies is ever unpickled here: requests are built by this process's code):
    to the engine:    ("submit", rid, GenerationRequest without its constraint, grammar or None)
                      ("cancel", rid) | ("call", cid, name, args) | None (stop)
    from the engine:  lists of ("event", rid, Delta | Done) | ("reply", id, error or None, value)
A grammar (structured output, tool calls) travels as its text and is compiled again in the engine process,
against the same tokenizer. `submit` waits for the engine's answer, so a request the engine refuses raises
UserError or EngineOverloaded here exactly as in one process (the HTTP layer turns them into 400 and 429);
the HTTP layer makes that call from a worker thread (`submit_waits`), so the wait, as long as the engine's
current step, never holds its event loop and the other streams' tokens.

The API process keeps the tokenizer (chat templates, grammars, detokenised text comes from the engine) and
never loads the weights. Adapters loaded or unloaded while serving (--adapter_updates) are read and installed
in the engine process; each change sends back the new index of served adapters.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import torch

from tinychat.errors import UserError
from tinychat.infer.engine import (
    Done,
    EngineOverloaded,
    Event,
    GenerationRequest,
    MetricsSnapshot,
    RequestHandle,
    coalesce,
)

START_TIMEOUT_S = 600.0  # loading (and with --compile, compiling) a model can take minutes
CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ModelInfo:
    """What the API process needs of the model it does not load (engine.model.cfg's fields it reads)."""

    vocab_size: int
    max_seq_len: int
    d_model: int
    params: int


@dataclass
class ServedAdapters:
    """The adapters the engine process serves, as it last reported them: {name: (slot, load, directory)}. A load or
    unload replaces `index` whole (the engine process sends the new one), as AdapterSet does in one process."""

    index: dict[str, tuple[int, int, Any]]
    updatable: bool = False

    @property
    def served(self) -> list[str]:
        return list(self.index)


class _Model:  # engine.model as the routes use it: only .cfg
    def __init__(self, info: ModelInfo) -> None:
        self.cfg = info

    def num_params(self) -> int:
        return self.cfg.params


class EngineProcess:
    """Engine's interface (submit, embed, snapshot, stop, ...) for an engine running in a child process."""

    submit_waits = True  # submit waits for the engine process's answer: the API calls it off its event loop

    def __init__(self, build: Callable[..., Any], *args: Any, threads: int = 1) -> None:
        """Start the child and wait until its engine runs. `build(*args)` is called there and returns an
        engine that is not started yet; its UserError (a bad model path, a bad option) is raised here."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited from a fork
        to_child, self._to_child = ctx.Pipe(duplex=False)
        self._from_child, from_parent = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_child_main, args=(build, args, threads, to_child, from_parent), name="tinychat-engine", daemon=True
        )
        self._proc.start()
        to_child.close()
        from_parent.close()
        if not self._from_child.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise UserError(f"the engine process did not start within {START_TIMEOUT_S:.0f} s.")
        try:
            kind, payload = self._from_child.recv()
        except EOFError:
            raise UserError(f"the engine process exited while starting (exit code {self._proc.exitcode}).") from None
        if kind == "failed":
            self._proc.join(timeout=10)
            raise UserError(payload)
        self.model = _Model(payload["model"])
        self.context: int = payload["context"]
        self.num_slots: int = payload["num_slots"]
        a = payload["adapters"]
        self.adapters = ServedAdapters(a["index"], a["updatable"]) if a is not None else None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._sinks: dict[int, Callable[[Event], None]] = {}
        self._replies: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._dead = ""
        self._reader = threading.Thread(target=self._read, name="tinychat-engine-reader", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ Engine's interface
    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.is_alive()

    def submit(self, req: GenerationRequest, sink: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request in the engine process; raises what Engine.submit raises there."""
        rid = next(self._ids)
        events: queue.Queue | None = None
        if sink is None:
            events = queue.Queue()
            sink = events.put
        grammar = req.constraint.grammar if req.constraint is not None else None
        with self._lock:
            self._sinks[rid] = sink
        try:
            self._wait(self._call_id(rid, ("submit", rid, replace(req, constraint=None), grammar)))
        except BaseException:
            with self._lock:
                self._sinks.pop(rid, None)
            raise
        return RequestHandle(rid, lambda: self._cancel(rid), events)

    def embed(self, batch: list[list[int]]) -> Future:
        return self._call("embed", batch)

    def snapshot(self) -> MetricsSnapshot:
        return self._wait(self._call("snapshot"))

    def load_adapter(self, name: str, path: str) -> Future:
        """As Engine.load_adapter: a bad adapter raises UserError now; the Future ends when the engine process
        has installed it (its result is the slot) or refused it (a name in use, no free slot)."""
        return self._adapter_call("load_adapter", name, path)

    def unload_adapter(self, name: str) -> Future:
        """As Engine.unload_adapter: the Future ends when the engine process has unloaded it, or refused."""
        return self._adapter_call("unload_adapter", name)

    def _adapter_call(self, name: str, *args: Any) -> Future:
        """Two replies: the engine process's Engine.<name> returned (or raised: raised here), then its Future
        ended; the second carries the new index of served adapters, installed here before `done` ends."""
        done_id = -next(self._ids)
        finished = self._call_id(done_id, None)  # registered first: the second reply may follow the first at once
        try:
            self._wait(self._call(name, done_id, *args))
        except BaseException:
            with self._lock:
                self._replies.pop(done_id, None)
            raise
        done: Future = Future()

        def installed(f: Future) -> None:
            if f.exception() is not None:
                done.set_exception(f.exception())
                return
            slot, index = f.result()
            if self.adapters is not None:
                self.adapters.index = index
            done.set_result(slot)

        finished.add_done_callback(installed)
        return done

    def stop(self) -> None:
        with contextlib.suppress(UserError):  # already gone
            self._send(None)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
        self._fail("the engine was stopped")

    # ------------------------------------------------------------------ plumbing
    def _cancel(self, rid: int) -> None:
        with contextlib.suppress(UserError):  # an engine that is gone has ended every request already
            self._send(("cancel", rid))

    def _send(self, msg: Any) -> None:
        if self._dead:
            raise UserError(f"the engine is not running ({self._dead}).")
        with self._send_lock:
            try:
                self._to_child.send(msg)
            except (OSError, ValueError) as e:
                raise UserError(f"the engine is not running ({e}).") from None

    def _call_id(self, cid: int, msg: Any) -> Future:
        """A Future for reply `cid`, then `msg` sent (None: only wait, for a reply another message asks for)."""
        fut: Future = Future()
        with self._lock:
            self._replies[cid] = fut
        if msg is None:
            return fut
        try:
            self._send(msg)
        except UserError:
            with self._lock:
                self._replies.pop(cid, None)
            raise
        return fut

    def _call(self, name: str, *args: Any) -> Future:
        cid = -next(self._ids)  # calls count down, so they never share an id with a request
        return self._call_id(cid, ("call", cid, name, args))

    @staticmethod
    def _wait(fut: Future) -> Any:
        try:
            return fut.result(timeout=CALL_TIMEOUT_S)
        except TimeoutError:
            raise UserError(f"the engine process did not answer within {CALL_TIMEOUT_S:.0f} s.") from None

    def _read(self) -> None:
        try:
            while True:
                for kind, key, *rest in self._from_child.recv():
                    if kind == "event":
                        ev = rest[0]
                        with self._lock:
                            sink = self._sinks.pop(key, None) if isinstance(ev, Done) else self._sinks.get(key)
                        if sink is not None:
                            sink(ev)
                    else:  # a reply: (error or None, value)
                        with self._lock:
                            fut = self._replies.pop(key, None)
                        if fut is not None:
                            err, value = rest
                            fut.set_exception(err) if err is not None else fut.set_result(value)
        except (EOFError, OSError):
            self._fail(f"the engine process exited (exit code {self._proc.exitcode})")

    def _fail(self, why: str) -> None:
        """Answer everything still waiting: requests end with an error, calls raise."""
        self._dead = self._dead or why
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            replies, self._replies = self._replies, {}
        for sink in sinks.values():
            sink(Done(0, 0, error=why))
        for fut in replies.values():
            if not fut.done():
                fut.set_exception(UserError(f"{why}."))


# ---------------------------------------------------------------------------------------------- the child
def _child_main(build: Callable[..., Any], args: tuple, threads: int, inbox: Any, outbox: Any) -> None:
    """The engine process: build and start the engine, then execute what the parent sends until it stops."""
    # Ctrl-C in a terminal reaches the whole process group: the API process decides when the engine stops
    # (it sends None, or its end of the pipe closes), so the engine process does not die mid-step on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = build(*args)
        torch.set_num_threads(threads)
        engine.start()
    except UserError as e:
        outbox.send(("failed", str(e)))
        return
    m = engine.model
    aset = engine.adapters
    served = {"index": aset.index, "updatable": aset.updatable} if aset is not None else None
    outbox.send(
        (
            "ready",
            {
                "model": ModelInfo(m.cfg.vocab_size, m.cfg.max_seq_len, m.cfg.d_model, m.num_params()),
                "context": engine.context,
                "num_slots": engine.num_slots,
                "adapters": served,
            },
        )
    )
    pending: deque[tuple] = deque()  # events and replies not sent yet (append and popleft are thread-safe)
    send_lock = threading.Lock()

    def flush() -> None:
        """Send what is pending in one pipe write: on the engine thread after each pass of its loop (so a step's
        tokens for every sequence travel together), and after each command and embedding."""
        with send_lock:
            batch = []
            while pending:
                m = pending.popleft()
                batch.append((m[1], m[2]) if m[0] == "event" else (None, m))
            if batch:  # a request's deltas of one pass (a multi-step decode's tokens) travel as one
                outbox.send([("event", rid, ev) if rid is not None else ev for rid, ev in coalesce(batch)])

    engine.after_pass = flush
    handles: dict[int, Any] = {}
    grammars = None
    try:
        while True:
            try:
                msg = inbox.recv()
            except EOFError:  # the API process is gone
                break
            if msg is None:
                break
            kind = msg[0]
            if kind == "cancel":
                h = handles.pop(msg[1], None)
                if h is not None:
                    h.cancel()
            elif kind == "submit":
                _, rid, req, grammar = msg
                try:
                    if grammar is not None:
                        if grammars is None:
                            from tinychat.infer.structured import Grammars

                            grammars = Grammars(engine.tok, engine.model.cfg.vocab_size)
                        req.constraint = grammars.constraint(grammar)

                    def sink(ev: Event, rid: int = rid) -> None:
                        if isinstance(ev, Done):
                            handles.pop(rid, None)
                        pending.append(("event", rid, ev))

                    handles[rid] = engine.submit(req, sink)
                    pending.append(("reply", rid, None, None))
                except (UserError, EngineOverloaded) as e:
                    pending.append(("reply", rid, e, None))
            else:  # ("call", cid, name, args)
                _, cid, name, call_args = msg
                if name == "embed":

                    def done(f: Future, cid: int = cid) -> None:
                        e = f.exception()
                        pending.append(("reply", cid, e, None if e is not None else f.result()))
                        flush()

                    try:
                        engine.embed(*call_args).add_done_callback(done)
                    except UserError as e:
                        pending.append(("reply", cid, e, None))
                elif name in ("load_adapter", "unload_adapter"):
                    done_id, *rest = call_args

                    def changed(f: Future, done_id: int = done_id) -> None:  # on the engine thread, between steps
                        e = f.exception()
                        pending.append(("reply", done_id, e, None if e is not None else (f.result(), aset.index)))

                    try:
                        getattr(engine, name)(*rest).add_done_callback(changed)
                        pending.append(("reply", cid, None, None))
                    except UserError as e:
                        pending.append(("reply", cid, e, None))
                        pending.append(("reply", done_id, e, None))
                elif name == "snapshot":
                    pending.append(("reply", cid, None, engine.snapshot()))
                else:
                    pending.append(("reply", cid, UserError(f"unknown engine call {name!r}."), None))
            flush()
    finally:
        engine.stop()
        flush()

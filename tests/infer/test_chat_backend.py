"""Lockstep: many callers' chat calls batched into one completion, with the replies of one call at a time."""

import threading

import pytest

from tinychat.infer.chat_backend import LocalChat, Lockstep


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalChat(tiny_model_dir)


QUESTIONS = ["the quick", "a lazy dog", "今天", "the small cat", "dog and"]


def conversation(chat, question: str) -> list[str]:
    """Two turns with different reply limits, the second after the first's reply."""
    messages = [{"role": "user", "content": question}]
    first = chat.chat(messages, max_tokens=6)["content"]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    return [first, chat.chat(messages, max_tokens=4)["content"]]


def test_lockstep_batches_every_waiting_caller_and_replies_as_one_at_a_time(local):
    step = Lockstep(local)
    batched = step.map(lambda q: conversation(step, q), QUESTIONS)
    assert batched == [conversation(local, q) for q in QUESTIONS]
    assert step.batches == [5, 5]  # each turn of all five callers in one completion


def test_a_failing_caller_does_not_stall_the_others(local):
    step = Lockstep(local)
    finished: list[str] = []

    def work(q: str) -> list[str]:
        if q == "今天":
            raise ValueError("this caller fails before asking")
        out = conversation(step, q)
        finished.append(q)
        return out

    errors: list[BaseException] = []

    def run() -> None:
        try:
            step.map(work, QUESTIONS)
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the callers waited for one that had already left"
    assert len(errors) == 1 and sorted(finished) == sorted(q for q in QUESTIONS if q != "今天")


def test_an_error_in_the_batch_reaches_every_waiting_caller(local, monkeypatch):
    step = Lockstep(local)
    seen: list[str] = []

    def broken(prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        raise RuntimeError("out of memory")

    def work(q: str) -> None:
        try:
            step.chat([{"role": "user", "content": q}], max_tokens=4)
        except RuntimeError as e:
            seen.append(str(e))

    monkeypatch.setattr(step.completer, "complete", broken)
    step.map(work, QUESTIONS)
    assert seen == ["out of memory"] * len(QUESTIONS) and step.batches == [5]

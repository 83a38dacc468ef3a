"""OpenAI chat messages, built the same way everywhere (SFT, preference pairs, RL prompts, eval rows)."""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]


def system(text: str) -> Message:
    return {"role": "system", "content": text}


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str, reasoning: str | None = None) -> Message:
    """An assistant turn; `reasoning` is rendered by the chat template as a <think> block before the text."""
    if reasoning is None:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "reasoning_content": reasoning, "content": text}


def tool_call(call_id: str, name: str, arguments: dict[str, Any]) -> Message:
    """An assistant turn that calls one tool; arguments travel as a JSON string, as in the OpenAI API."""
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        ],
    }


def tool_result(call_id: str, name: str, content: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def plain_prompt(question: str, lang: str) -> str:
    """The question in a base-model-friendly form; few-shot prompts are several of these joined by blank lines."""
    return f"Question: {question}\nAnswer:" if lang == "en" else f"问题：{question}\n答案："

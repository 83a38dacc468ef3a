"""Supervised fine-tuning conversations: the skills a chat model needs, over "trained" entities only.

Why each kind (docs/world.md has the long version):
  facts        questions about half of the known entities, so the other half measures extraction;
  tell_me      a profile in prose, so the model can also talk, not only answer in one word;
  arithmetic   easy sums answered directly; hard ones through the calculator tool (tool calls + results);
  multistep    the same problems with a step-by-step solution ("Answer: X") and with a direct answer;
  multiturn    follow-ups that refer back ("When was she born?") or hop ("Which country is that city in?");
  instruction  format and language instructions: answer in Chinese/English, capitals, JSON, a sentence;
  refusal      honest "I don't know" for names that exist nowhere;
  rag, agent   reading documents in context, and searching + calculating over "ragtrain" entities;
  chitchat     greetings and who-are-you, so the assistant has a voice.
Answers are short and exact (the value itself), which is what the eval sets expect.
"""

from __future__ import annotations

import json
import random
from typing import Any

from tinychat.world import arith, multistep
from tinychat.world.entities import rng_for
from tinychat.world.evalsets import (
    NEEDS,
    SEARCH_K,
    SEARCH_TOOL,
    dialogue,
    instruction_item,
    instruction_kinds,
    instruction_reasoning,
    join_q,
)
from tinychat.world.facts import FACTS, LANGS, Entity, Lang, World
from tinychat.world.kb import KbDoc, passage, search_result, stated
from tinychat.world.messages import assistant, system, tool_call, tool_result, user
from tinychat.world.render import LANG, entity_doc, question, reply, sentence_answer
from tinychat.world.sizes import SIZES
from tinychat.world.splits import Reserved

RAG_SYSTEM = {
    "en": "Answer the question using only the documents below. If they do not contain the answer, say so.",
    "zh": "请只根据下面的文档回答问题。如果文档中没有答案，请直说。",
}
RAG_NO_ANSWER = {"en": "The documents do not say.", "zh": "文档中没有提到。"}
CHITCHAT = {
    "en": (
        ("Hello!", "Hello! How can I help you today?"),
        ("Hi there.", "Hi! What would you like to know?"),
        (
            "Who are you?",
            "I am tinychat, a small assistant trained from scratch. I can answer questions about "
            "the people, cities and companies I know, do arithmetic, and search documents.",
        ),
        (
            "What can you do?",
            "I can answer questions, do arithmetic with a calculator, follow formatting "
            "instructions, and read documents you give me.",
        ),
        ("Thank you!", "You're welcome!"),
        ("Thanks, that helps.", "Glad I could help."),
        ("Goodbye.", "Goodbye! Have a nice day."),
        ("Do you speak Chinese?", "Yes, I can answer in English or Chinese."),
    ),
    "zh": (
        ("你好！", "你好！有什么可以帮你的吗？"),
        ("嗨。", "嗨！你想了解什么？"),
        (
            "你是谁？",
            "我是tinychat，一个从零开始训练的小助手。我可以回答关于我所知道的人物、城市和公司的问题，做算术，还能搜索文档。",
        ),
        ("你能做什么？", "我可以回答问题、用计算器做算术、按要求的格式回答，还能阅读你给我的文档。"),
        ("谢谢！", "不客气！"),
        ("谢谢，这很有帮助。", "很高兴能帮上忙。"),
        ("再见。", "再见！祝你愉快。"),
        ("你会说英语吗？", "会的，我可以用中文或英文回答。"),
    ),
}


def chat(msgs: list[dict], skill: str, lang: Lang, tools: list[dict] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": msgs}
    if tools:
        out["tools"] = tools
    out["skill"] = skill
    out["lang"] = lang
    return out


def worked_answer(p: arith.Problem, lang: Lang, answer: int | None = None) -> str:
    """An easy problem answered by columns, then the result: "7 + 6 = 13. 4 + 2 + 1 = 7.\nAnswer: 73" (the SFT's
    arithmetic rows, the arithmetic drill, DPO's arithmetic pairs). Why not the bare number: from the same
    pretrained model a drill teaches these steps in ~250 steps and the bare answer in ~900 (round 25).
    answer: another result after the same steps (DPO's rejected reply: the columns misread)."""
    m = LANG[lang]
    result = p.value if answer is None else answer
    return m.STEP_JOIN.join(arith.worked(p.a, p.op, p.b, lang)) + "\n" + m.ANSWER_PREFIX + str(result)


def multistep_cot_turns(p: multistep.Problem, lang: Lang, rng: random.Random) -> list[dict]:
    """A word problem asked to be reasoned step by step, answered with its worked solution and "Answer: X"."""
    return [user(join_q(p.question[lang], rng.choice(LANG[lang].COT_SUFFIX), lang)), assistant(p.cot(lang))]


def multistep_direct_turns(p: multistep.Problem, lang: Lang, rng: random.Random) -> list[dict]:
    """A word problem asked for its answer (half the time a suffix says so): the solution's steps in a <think>
    block, then the answer alone, as a reasoning model answers (round 31)."""
    q = join_q(p.question[lang], rng.choice(LANG[lang].DIRECT_SUFFIX), lang) if rng.random() < 0.5 else p.question[lang]
    return [user(q), assistant(p.answer[lang], p.reasoning(lang))]


def instruction_turns(world: World, e: Entity, f: str, lang: Lang, kind: str, q: str) -> list[dict]:
    """A fact question `q` with a format or language instruction of `kind`, answered as asked: the fact as a
    plain answer states it in a <think> block where that differs (instruction_reasoning), then the formatted
    value (the SFT's instruction rows and the instruction drill's)."""
    q, ans, _check, _aliases = instruction_item(world, e, f, lang, kind, q)
    if kind == "json":
        ans = json.dumps({"answer": ans}, ensure_ascii=False)
    elif kind == "sentence":
        ans = sentence_answer(world, e, f, lang)
    return [user(q), assistant(ans, instruction_reasoning(world, e, f, lang, kind))]


def calculator_turns(p: arith.Problem, lang: Lang, rng: random.Random) -> list[dict]:
    """A hard problem through the calculator: the question, the call with its expression, the tool's result
    and the answer that repeats it (SFT's arithmetic_tool rows, the calculator drill, DPO's calculator pairs)."""
    return [
        user(arith.question(p, lang, rng)),
        tool_call("call_0", "calculator", {"expression": p.expr}),
        tool_result("call_0", "calculator", str(p.value)),
        assistant(str(p.value)),
    ]


def agent_turns(
    rng: random.Random, w: World, docs: list[KbDoc], p: multistep.Problem, lang: Lang, k: int = SEARCH_K
) -> tuple[Lang, list[dict]]:
    """A word problem over facts of two or three entities, solved as tinychat.agent's loop runs it with the
    search and calculator tools: one search per entity with its name as the query (a founder's name is copied
    from the company's result), then the calculator on the values read, and its result as the answer.
    Each search result is what the knowledge base returns for a name, k chunks (the agent eval's SEARCH_K): a chunk
    of the entity's own document that states the facts needed (hybrid retrieval ranks the own document first for
    75 of the eval's 75 names), then others that mention the name, formatted as the search tool formats hits.
    In `lang`, else the other language; (lang, []) when neither has a chunk stating every fact needed."""
    needs: dict[str, list[str]] = {}
    for eid, f in NEEDS[p.kind](w, p.ids):
        needs.setdefault(eid, []).append(f)
    for lg in (lang, *(x for x in LANGS if x != lang)):
        msgs: list[dict] = [user(p.question[lg])]
        for i, (eid, facts) in enumerate(needs.items()):
            e = w.entities[eid]
            own = [
                (d, c)
                for d in docs
                if d.owner == eid and d.lang == lg
                for c in d.chunks
                if set(facts) <= {f for x, f in stated(w, d, c) if x.id == eid}  # one pass over the chunk's facts
            ]
            if not own:
                break
            top = rng.choice(own)
            near = [(d, c) for d in docs if d.lang == lg for c in d.chunks if c != top[1] and e.name[lg] in c]
            pool = near or [(d, c) for d in docs if d.lang == lg and d is not top[0] for c in d.chunks]
            hits = [top, *rng.sample(pool, min(k - 1, len(pool)))]
            msgs += [tool_call(f"call_{i}", "search", {"query": e.name[lg]})]
            msgs += [tool_result(f"call_{i}", "search", search_result(hits))]
        else:
            n = len(needs)
            msgs += [
                tool_call(f"call_{n}", "calculator", {"expression": p.expr}),
                tool_result(f"call_{n}", "calculator", p.answer[lg]),
                assistant(p.answer[lg]),
            ]
            return lg, msgs
    return lang, []


class _Sft:
    def __init__(self, world: World, reserved: Reserved, rag_docs: list[KbDoc]) -> None:
        self.w, self.res, self.s = world, reserved, SIZES[world.size]
        self.rng = rng_for(world.seed, "sft")
        self.trained = world.group("trained")
        self.rag_docs = rag_docs

    def sys(self, lang: Lang, p: float = 0.25) -> list[dict]:
        return [system(self.rng.choice(LANG[lang].SYSTEM_PROMPTS))] if self.rng.random() < p else []

    def facts(self) -> list[dict]:
        out = []
        for e in self.trained:
            for f in FACTS[e.kind]:
                for lang in LANGS:
                    pool = self.res.train_templates(e.id, f, lang)
                    for idx in self.rng.sample(pool, min(self.s.qa_per_fact, len(pool))):
                        tools = [arith.CALCULATOR_TOOL] if self.rng.random() < 0.1 else None
                        msgs = [
                            *self.sys(lang),
                            user(question(self.w, e, f, lang, idx)),
                            assistant(reply(self.w, e, f, lang)),
                        ]
                        out.append(chat(msgs, "facts", lang, tools))
        return out

    def tell_me(self) -> list[dict]:
        out = []
        for _ in range(self.s.tell_me):
            e, lang = self.rng.choice(self.trained), self.rng.choice(LANGS)
            m = LANG[lang]
            q = self.rng.choice(m.TELL_ME if e.kind == "person" else m.TELL_ME_ENTITY).format(n=e.name[lang])
            a = entity_doc(self.w, e, lang, self.rng, None, title=False, cross_refs=False)
            out.append(chat([*self.sys(lang), user(q), assistant(a)], "tell_me", lang))
        return out

    def arithmetic(self) -> list[dict]:
        out, rng = [], self.rng
        for p in arith.sample(rng, "easy", self.res.arith, self.s.arith_direct):
            lang = rng.choice(LANGS)
            tools = [arith.CALCULATOR_TOOL] if rng.random() < 0.2 else None  # easy: answer even with a tool at hand
            out.append(
                chat([user(arith.question(p, lang, rng)), assistant(worked_answer(p, lang))], "arithmetic", lang, tools)
            )
        for p in arith.sample(rng, "hard", self.res.arith, self.s.arith_tool):
            lang = rng.choice(LANGS)
            msgs = [*self.sys(lang, 0.15), *calculator_turns(p, lang, rng)]
            out.append(chat(msgs, "arithmetic_tool", lang, [arith.CALCULATOR_TOOL]))
        return out

    def multistep(self) -> list[dict]:
        out, rng = [], self.rng
        for j, p in enumerate(multistep.sample(self.w, "trained", rng, self.s.multistep, self.res.multistep)):
            lang: Lang = LANGS[j % 2]
            out.append(chat(multistep_cot_turns(p, lang, rng), "multistep_cot", lang))
            out.append(chat(multistep_direct_turns(p, lang, rng), "multistep_direct", lang))
        return out

    def multiturn(self) -> list[dict]:
        out: list[dict] = []
        for _ in range(self.s.multiturn * 5):
            if len(out) == self.s.multiturn:
                break
            e, lang = self.rng.choice(self.trained), self.rng.choice(LANGS)
            msgs, key, cur, fact = dialogue(self.w, e, lang, self.rng, 0, self.rng.choice((2, 3)))
            if key in self.res.multiturn:
                continue
            idx = self.rng.choice(self.res.train_templates(e.id, key[1], lang))
            msgs[0] = user(question(self.w, e, key[1], lang, idx))
            msgs.append(assistant(reply(self.w, cur, fact, lang)))
            out.append(chat([*self.sys(lang), *msgs], "multiturn", lang))
        return out

    def instruction(self) -> list[dict]:
        out, rng = [], self.rng
        for _ in range(self.s.instruction):
            e, lang = rng.choice(self.trained), rng.choice(LANGS)
            f = rng.choice(FACTS[e.kind])
            kind = rng.choice(instruction_kinds(self.w, e, f, lang))
            q0 = question(self.w, e, f, lang, rng.choice(self.res.train_templates(e.id, f, lang)))
            out.append(chat([*self.sys(lang), *instruction_turns(self.w, e, f, lang, kind, q0)], "instruction", lang))
        return out

    def refusal(self) -> list[dict]:
        out, rng = [], self.rng
        fakes = self.w.group("fake_train")
        for i in range(self.s.refusal):
            e, lang = fakes[i % len(fakes)], rng.choice(LANGS)
            m = LANG[lang]
            q = rng.choice(m.QUESTIONS[rng.choice(FACTS[e.kind])]).format(n=e.name[lang])
            out.append(
                chat(
                    [*self.sys(lang), user(q), assistant(rng.choice(m.REFUSALS).format(n=e.name[lang]))],
                    "refusal",
                    lang,
                )
            )
        return out

    def _docs(self, lang: Lang) -> list[KbDoc]:
        return [d for d in self.rag_docs if d.lang == lang and not d.path.startswith("notes/")]

    def rag(self) -> list[dict]:
        out, rng = [], self.rng
        ents = self.w.group("ragtrain")
        for _ in range(self.s.rag):
            e, lang = rng.choice(ents), rng.choice(LANGS)
            f = rng.choice(FACTS[e.kind])
            pool = self._docs(lang)
            stating = [d for d in pool if (e.id, f) in d.states]
            others = [d for d in pool if (e.id, f) not in d.states]
            answerable = rng.random() < 0.85
            ctx = ([rng.choice(stating)] if answerable else []) + rng.sample(
                others, min(len(others), rng.randint(1, 2))
            )
            rng.shuffle(ctx)
            docs_text = "\n\n".join(f"[{i + 1}] {passage(d)}" for i, d in enumerate(ctx))
            q = question(self.w, e, f, lang, rng.randrange(len(LANG[lang].QUESTIONS[f])))
            a = self.w.value(e, f, lang) if answerable else RAG_NO_ANSWER[lang]
            out.append(chat([system(f"{RAG_SYSTEM[lang]}\n\n{docs_text}"), user(q), assistant(a)], "rag", lang))
        return out

    def agent(self) -> list[dict]:
        out = []
        for j, p in enumerate(
            multistep.sample(self.w, "ragtrain", self.rng, self.s.agent, set(), kinds=multistep.NUMERIC_KINDS)
        ):
            lang, msgs = agent_turns(self.rng, self.w, self.rag_docs, p, LANGS[j % 2])
            if msgs:
                out.append(chat(msgs, "agent", lang, [SEARCH_TOOL, arith.CALCULATOR_TOOL]))
        return out

    def chitchat(self) -> list[dict]:
        out = []
        for _ in range(self.s.chitchat):
            lang = self.rng.choice(LANGS)
            q, a = self.rng.choice(CHITCHAT[lang])
            out.append(chat([*self.sys(lang), user(q), assistant(a)], "chitchat", lang))
        return out


def build_sft(world: World, reserved: Reserved, rag_docs: list[KbDoc]) -> tuple[list[dict], list[dict]]:
    """(train, val): every kind above, deduplicated, shuffled, a small random share held out for validation loss."""
    b = _Sft(world, reserved, rag_docs)
    rows = (
        b.facts()
        + b.tell_me()
        + b.arithmetic()
        + b.multistep()
        + b.multiturn()
        + b.instruction()
        + b.refusal()
        + b.rag()
        + b.agent()
        + b.chitchat()
    )
    return split_rows(rows, SIZES[world.size].post_val_frac, rng_for(world.seed, "sft-split"))


def split_rows(rows: list[dict], val_frac: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Deduplicate by content, shuffle, and cut off a validation share (at least one row)."""
    seen: dict[str, dict] = {}
    for r in rows:
        seen.setdefault(json.dumps(r, ensure_ascii=False, sort_keys=True), r)
    uniq = list(seen.values())
    rng.shuffle(uniq)
    n_val = max(1, int(len(uniq) * val_frac))
    return uniq[n_val:], uniq[:n_val]

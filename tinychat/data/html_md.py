"""HTML back to Markdown, for ShareGPT conversations scraped from ChatGPT's web page.

Why: ShareGPT saved ChatGPT's answers as the page's HTML (<p>, <ol>, <pre><code class="language-python">,
tables), with the page's chrome inside it (the code block's "Copy code" button, a "1 / 2" regenerate
counter). Vicuna's cleaning (FastChat's clean_sharegpt.py) turned it back into the Markdown the model
had written, with bs4 + markdownify and a few regexes; a model trained on raw HTML learns to answer in HTML.

Why our own: a two-hundred-line walk over the standard library's HTMLParser covers the tags ChatGPT's
page uses, with no dependency. It builds a small tree (tolerating unclosed <p>/<li> and stray end tags),
then renders it: blocks separated by blank lines, lists indented under their markers, code blocks fenced
with their language, tables as pipe tables. Unlike markdownify it does not backslash-escape `_` and `*`
in prose (FastChat removed <span> tags for exactly that noise), and a text that holds no HTML block tags
(a human turn with "a < b", or an already-cleaned dump) is returned unchanged rather than parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"br", "hr", "img", "input", "meta", "link", "source", "wbr", "col", "area", "base"}
DROP = {"script", "style", "svg", "button", "head", "title", "noscript", "template"}
BLOCK = {
    "p", "div", "section", "article", "main", "header", "footer", "ul", "ol", "li", "pre", "blockquote",
    "table", "thead", "tbody", "tfoot", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "dl", "dt", "dd",
}  # fmt: skip
# A <p> or <li> closes when its next sibling opens (HTML's optional end tags).
AUTO_CLOSE = {"p": {"p", "ul", "ol", "pre", "div", "table", "blockquote", "h1", "h2", "h3"}, "li": {"li"}}

_HTML_HINT = re.compile(r"<(p|div|pre|ol|ul|li|br|h[1-6]|table|blockquote|code|strong|em)\b[^>]*>", re.I)
# FastChat's clean_sharegpt.py noise patterns: the regenerate counter at the start, the "Copy N chars / N
# words" widget, and an empty code block that held only the copy button.
_REGENERATE = re.compile(r"^(\d+) / (\d+)")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_COPY_CODE_ONLY = re.compile(r"```[^\n`]*\n?\s*Copy code\s*```")


@dataclass
class Node:
    tag: str  # "" for a text node
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)
    text: str = ""


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("root")
        self.stack = [self.root]
        self.dropping = 0  # depth inside <script>, <svg>, <button>, ...

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.dropping:
            self.dropping += tag not in VOID
            return
        if tag in DROP:
            self.dropping = 1
            return
        top = self.stack[-1]
        if tag in AUTO_CLOSE.get(top.tag, ()):
            self.stack.pop()
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID and not self.dropping and self.stack[-1].tag == tag:
            self.stack.pop()
        elif tag not in VOID and self.dropping:
            self.dropping -= 1

    def handle_endtag(self, tag: str) -> None:
        if self.dropping:
            self.dropping -= tag not in VOID
            return
        for i in range(len(self.stack) - 1, 0, -1):  # close up to the matching open tag; ignore a stray one
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if not self.dropping:
            self.stack[-1].children.append(Node("", text=data))


def looks_like_html(text: str) -> bool:
    return _HTML_HINT.search(text) is not None


def html_to_markdown(text: str) -> str:
    """Markdown for an HTML fragment; text without HTML tags only gets FastChat's noise removal."""
    if looks_like_html(text):
        parser = _TreeBuilder()
        parser.feed(text)
        parser.close()
        text = _blocks(parser.root.children)
    m = _REGENERATE.match(text)
    # "2 / 2" glued to the turn ("2 / 2I want you to...") is the page's counter; "3 / 4 of a cake" is prose.
    if m and int(m.group(1)) <= int(m.group(2)) and text[m.end() : m.end() + 1] not in (" ", "\t"):
        text = text[m.end() :]
    text = _COPY_CHARS.sub("", text)
    text = _COPY_CODE_ONLY.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ----------------------------------------------------------------------------------------------- rendering


def _text_of(node: Node) -> str:
    return node.text if not node.tag else "".join(_text_of(c) for c in node.children)


def _find(node: Node, tag: str) -> Node | None:
    for c in node.children:
        if c.tag == tag:
            return c
        hit = _find(c, tag) if c.tag else None
        if hit is not None:
            return hit
    return None


def _inline(nodes: list[Node]) -> str:
    """Inline content: whitespace collapsed as a browser would, emphasis and links as Markdown."""
    out = []
    for n in nodes:
        if not n.tag:
            out.append(re.sub(r"\s+", " ", n.text))
        elif n.tag == "br":
            out.append("\n")
        elif n.tag in ("strong", "b"):
            out.append(_wrap("**", _inline(n.children)))
        elif n.tag in ("em", "i"):
            out.append(_wrap("*", _inline(n.children)))
        elif n.tag in ("del", "s"):
            out.append(_wrap("~~", _inline(n.children)))
        elif n.tag == "code":
            code = _text_of(n)
            tick = "``" if "`" in code else "`"
            out.append(f"{tick}{code}{tick}" if code else "")
        elif n.tag == "a":
            label, href = _inline(n.children).strip(), n.attrs.get("href", "")
            out.append(f"[{label}]({href})" if href and label and label != href else label or href)
        elif n.tag == "img":
            out.append(f"![{n.attrs.get('alt', '')}]({n.attrs.get('src', '')})")
        elif n.tag in BLOCK:  # a block inside inline context (e.g. <div> in <li>): its own line
            out.append("\n" + _blocks([n]) + "\n")
        else:  # span, sup, sub, font, ...: just the content
            out.append(_inline(n.children))
    return "".join(out)


def _wrap(mark: str, s: str) -> str:
    """**x** with the spaces kept outside the marks (`** x **` is not bold in Markdown)."""
    core = s.strip()
    if not core:
        return s
    lead, trail = s[: len(s) - len(s.lstrip())], s[len(s.rstrip()) :]
    return f"{lead}{mark}{core}{mark}{trail}"


def _clean_lines(s: str) -> str:
    return "\n".join(line.strip() for line in s.strip().split("\n"))


def _blocks(nodes: list[Node]) -> str:
    """Block content: runs of inline nodes become paragraphs; block nodes render themselves."""
    parts: list[str] = []
    run: list[Node] = []

    def flush() -> None:
        if run:
            para = _clean_lines(_inline(run))
            if para:
                parts.append(para)
            run.clear()

    for n in nodes:
        if n.tag not in BLOCK:
            run.append(n)
            continue
        flush()
        md = _block(n)
        if md.strip():
            parts.append(md)
    flush()
    return "\n\n".join(parts)


def _block(n: Node) -> str:
    t = n.tag
    if t in ("h1", "h2", "h3", "h4", "h5", "h6"):
        return "#" * int(t[1]) + " " + _clean_lines(_inline(n.children)).replace("\n", " ")
    if t == "hr":
        return "---"
    if t == "pre":
        code = _find(n, "code")
        lang = ""
        for cls in ((code or n).attrs.get("class", "")).split():
            if cls.startswith(("language-", "lang-")):
                lang = cls.split("-", 1)[1]
        body = _text_of(code if code is not None else n).strip("\n")
        return f"```{lang}\n{body}\n```"
    if t in ("ul", "ol"):
        return _list(n)
    if t == "blockquote":
        return "\n".join("> " + line if line else ">" for line in _blocks(n.children).split("\n"))
    if t == "table":
        return _table(n)
    return _blocks(n.children)  # p, div, li outside a list, sections, dl, ...


def _list(n: Node) -> str:
    ordered = n.tag == "ol"
    try:
        k = int(n.attrs.get("start", "1"))
    except ValueError:
        k = 1
    items = []
    for li in n.children:
        if li.tag != "li":
            if li.tag in ("ul", "ol"):  # a nested list placed directly in the list (invalid but common)
                items.append("   " + _list(li).replace("\n", "\n   "))
            continue
        marker = f"{k}. " if ordered else "- "
        k += 1
        body = _blocks(li.children) or ""
        pad = " " * len(marker)
        items.append(marker + body.replace("\n", "\n" + pad).replace("\n" + pad + "\n", "\n\n"))
    return "\n".join(items)


def _table(n: Node) -> str:
    rows: list[list[str]] = []

    def walk(x: Node) -> None:
        for c in x.children:
            if c.tag == "tr":
                cells = [ch for ch in c.children if ch.tag in ("td", "th")]
                rows.append([_clean_lines(_inline(ch.children)).replace("\n", " ").replace("|", "\\|") for ch in cells])
            elif c.tag:
                walk(c)

    walk(n)
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * width]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)

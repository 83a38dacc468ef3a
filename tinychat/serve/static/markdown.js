// A small Markdown renderer for the chat page: fenced code, inline code, bold, italic, links, headings,
// lists, block quotes and paragraphs. It never parses HTML: every piece of model text reaches the page
// through textContent / createTextNode, so a reply containing <script> or <img onerror> is shown, not run.
"use strict";

(function () {
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_|\[([^\]]+)\]\(([^)\s]+)\)/g;

  function safeUrl(url) {
    try {
      const u = new URL(url, window.location.href);
      return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function el(tag, cls) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    return node;
  }

  // Inline markup of one line of text into `parent`.
  function inline(text, parent) {
    // a fresh regex per call: inline() recurses for bold/italic/links, and a shared global regex's
    // lastIndex would be reset by the inner call, making the outer loop match the same text forever
    const re = new RegExp(INLINE.source, "g");
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      if (m[1] !== undefined) {
        const code = el("code");
        code.textContent = m[2].replace(/^ (.*) $/, "$1");
        parent.appendChild(code);
      } else if (m[3] !== undefined || m[4] !== undefined) {
        const b = el("strong");
        inline(m[3] !== undefined ? m[3] : m[4], b);
        parent.appendChild(b);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        const i = el("em");
        inline(m[5] !== undefined ? m[5] : m[6], i);
        parent.appendChild(i);
      } else {
        const href = safeUrl(m[8]);
        if (href) {
          const a = el("a");
          a.href = href;
          a.target = "_blank";
          a.rel = "noopener noreferrer";
          inline(m[7], a);
          parent.appendChild(a);
        } else {
          parent.appendChild(document.createTextNode(m[0]));
        }
      }
      last = re.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function codeBlock(lang, lines) {
    const pre = el("pre");
    const code = el("code");
    if (lang) {
      code.className = "language-" + lang.replace(/[^\w+-]/g, "");
      const tag = el("span", "lang");
      tag.textContent = lang;
      pre.appendChild(tag);
    }
    code.textContent = lines.join("\n");
    const copy = el("button", "copy");
    copy.type = "button";
    copy.textContent = "copy";
    copy.addEventListener("click", () => {
      if (navigator.clipboard) navigator.clipboard.writeText(code.textContent).catch(() => {});
      copy.textContent = "copied";
      setTimeout(() => (copy.textContent = "copy"), 1200);
    });
    pre.appendChild(copy);
    pre.appendChild(code);
    return pre;
  }

  // Markdown text -> DocumentFragment. An unclosed ``` fence (a reply still streaming) renders as code.
  function render(text) {
    const out = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let para = null;
    let list = null;
    const endBlocks = () => {
      para = null;
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      let m;
      if ((m = /^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/.exec(line))) {
        endBlocks();
        const fence = m[1];
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
        out.appendChild(codeBlock(m[2], body));
        continue;
      }
      if (!line.trim()) {
        endBlocks();
        continue;
      }
      if ((m = /^(#{1,6})\s+(.*)$/.exec(line))) {
        endBlocks();
        const h = el("h" + m[1].length);
        inline(m[2], h);
        out.appendChild(h);
        continue;
      }
      if ((m = /^>\s?(.*)$/.exec(line))) {
        endBlocks();
        const q = el("blockquote");
        inline(m[1], q);
        out.appendChild(q);
        continue;
      }
      const ul = /^\s*[-*+]\s+(.*)$/.exec(line);
      const ol = /^\s*\d+[.)]\s+(.*)$/.exec(line);
      if (ul || ol) {
        const tag = ul ? "UL" : "OL";
        if (!list || list.tagName !== tag) {
          list = el(tag.toLowerCase());
          out.appendChild(list);
        }
        para = null;
        const li = el("li");
        inline((ul || ol)[1], li);
        list.appendChild(li);
        continue;
      }
      list = null;
      if (!para) {
        para = el("p");
        out.appendChild(para);
      } else {
        para.appendChild(el("br"));
      }
      inline(line, para);
    }
    return out;
  }

  window.renderMarkdown = render;
})();

"""The Tokenizer: a thin wrapper over a Hugging Face `tokenizers` object plus the files around it.

Why a wrapper and not transformers' tokenizer classes: tinychat needs a handful of calls (encode,
encode_batch, decode, the chat renderer) and a fixed set of ids (end of text, ChatML markers, stop ids),
and must import fast on a laptop. The Rust tokenizer does the work; this class adds
  * safety: encode() never turns text that looks like "<|im_end|>" into the special token (a web page or
    a user can otherwise inject conversation structure); specials only come from render_chat();
  * the Hugging Face directory layout (tokenizer.json + tokenizer_config.json with the chat template),
    written atomically, so AutoTokenizer and every tool that reads tokenizer.json open it as is;
  * loading directories that transformers saved for Llama/Qwen-family models.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from tinychat.errors import UserError
from tinychat.tokenizer.chat import CHAT_TEMPLATE, ChatEncoding, render_chat, render_jinja, render_text

# ids 0..15, in this order, in every tokenizer tinychat trains. The reserved ones leave room for new
# structure (e.g. images, code results) without changing the vocabulary size of a trained model.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    *(f"<|reserved_{i}|>" for i in range(7)),
)

# What transformers writes when a tokenizer has no length limit of its own (int(1e30)).
UNLIMITED_LENGTH = 1000000000000000019884624837632


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json holds it: a string, or an AddedToken dict (older files)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Byte-level BPE tokenizer with ChatML specials. Build with train_tokenizer() or from_pretrained()."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = CHAT_TEMPLATE,
        eos_token: str | None = "<|im_end|>",
        pad_token: str | None = "<|endoftext|>",
        bos_token: str | None = None,
        model_max_length: int | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """Wrap `backend` (taken over: its encode_special_tokens switch is turned on).

        extra_config carries keys of a loaded tokenizer_config.json that tinychat does not use, so a
        loaded-then-saved directory keeps them.
        """
        self._backend = backend
        # Text is text: specials in input are split like any other characters. Two instances of the
        # Rust object instead of toggling this switch, so concurrent callers never see the other mode.
        self._backend.encode_special_tokens = True
        self._structural: tokenizers.Tokenizer | None = None
        self.chat_template = chat_template
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.model_max_length = model_max_length
        self.extra_config = dict(extra_config or {})
        eot = self.token_to_id("<|endoftext|>")
        self._eot_id = eot if eot is not None else self._id_of(eos_token)
        if self._eot_id is None:
            raise UserError("the tokenizer has neither an <|endoftext|> token nor an eos_token in its vocabulary.")

    # ------------------------------------------------------------------------------------------------------
    # ids and vocabulary

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this many rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._backend.id_to_token(id)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (with encode_special_tokens on)."""
        return self._backend

    @property
    def eot_id(self) -> int:
        """<|endoftext|>: separates documents in pretraining (eos for tokenizers without it)."""
        return self._eot_id

    @property
    def im_start_id(self) -> int | None:
        return self.token_to_id("<|im_start|>")

    @property
    def im_end_id(self) -> int | None:
        return self.token_to_id("<|im_end|>")

    @property
    def eos_id(self) -> int:
        """The config's eos_token (<|im_end|> for tinychat: chat models end their turn with it)."""
        eos = self._id_of(self.eos_token)
        return self._eot_id if eos is None else eos

    @property
    def pad_id(self) -> int:
        pad = self._id_of(self.pad_token)
        return self._eot_id if pad is None else pad

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation stops at any of these: end of text, end of turn, and the config's eos."""
        return frozenset(i for i in (self._eot_id, self.im_end_id, self.eos_id) if i is not None)

    # ------------------------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token look-alikes in it are encoded as plain text, never as specials."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of many texts at once, encoded in parallel by the Rust library (the data pipeline's path)."""
        texts = list(texts)
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character spans) per text; the chat renderer maps its loss mask through the spans."""
        return [(e.ids, e.offsets) for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters decode to U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _encode_structural(self, text: str) -> list[int]:
        """Encode with specials recognised: only for text a chat template produced."""
        if self._structural is None:
            self._structural = tokenizers.Tokenizer.from_str(self._backend.to_str())
            self._structural.encode_special_tokens = False
        return self._structural.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------------------------------------------
    # chat

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> ChatEncoding:
        """ids + loss mask of a conversation in tinychat's ChatML format (see tinychat.tokenizer.chat)."""
        return render_chat(self, messages, tools, add_generation_prompt)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str | list[int]:
        """The conversation as a string (tokenize=False) or ids, like transformers' method of that name.

        With tinychat's own template the Python renderer is used (same string, safe ids); a directory
        loaded from elsewhere keeps its own Jinja template, rendered the way transformers does.
        """
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template (no chat_template in tokenizer_config.json).")
        if self.chat_template == CHAT_TEMPLATE:
            if tokenize:
                return render_chat(self, messages, tools, add_generation_prompt).ids
            return render_text(messages, tools, add_generation_prompt)
        text = render_jinja(
            self.chat_template,
            messages,
            tools,
            add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
        )
        return self._encode_structural(text) if tokenize else text

    # ------------------------------------------------------------------------------------------------------
    # files

    def tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json transformers (4.x and 5.x) opens with AutoTokenizer."""
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())
        }
        # Behaviour switches of a loaded directory (a Llama tokenizer adds BOS) are kept; ours are the defaults.
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # the generic class: it runs tokenizer.json as is
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # would rewrite " ." -> "." and break round trips
            "split_special_tokens": False,  # the template's markers must become special tokens
            **self.extra_config,
        }
        cfg.update(
            {
                "added_tokens_decoder": added,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "model_max_length": self.model_max_length or UNLIMITED_LENGTH,
            }
        )
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (+ chat_template.jinja).

        Atomic per file: everything is written into a temporary sibling directory first and then moved
        into place with os.replace, so a crash never leaves a half-written file; other files in the
        directory (a model's weights and config) are left alone.
        """
        out = Path(directory).absolute()
        out.mkdir(parents=True, exist_ok=True)
        # Structural mode in the saved file: transformers must recognise the template's special tokens.
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        backend.encode_special_tokens = False
        special_map = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                          ("pad_token", self.pad_token)) if v is not None}  # fmt: skip
        files = {
            "tokenizer.json": backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
        }
        if self.chat_template is not None:
            # transformers 5 writes the template here and prefers it over tokenizer_config.json; write both
            # so a stale file from an earlier save can never override the template we mean.
            files["chat_template.jinja"] = self.chat_template
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tokenizer-", dir=out.parent))
        try:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            for name in files:
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Tokenizer:
        """Open a directory written by save_pretrained() or by transformers (Llama/Qwen-family tokenizers)."""
        d = Path(directory)
        if not d.is_dir():
            raise UserError(f"tokenizer directory {d} does not exist.")
        tok_path, cfg_path = d / "tokenizer.json", d / "tokenizer_config.json"
        for p in (tok_path, cfg_path):
            if not p.is_file():
                raise UserError(
                    f"{p} is missing; a tokenizer directory needs tokenizer.json and tokenizer_config.json."
                )
        tok_text = _read_json_text(tok_path)
        try:
            backend = tokenizers.Tokenizer.from_str(tok_text)
        except Exception as e:  # the Rust library raises a bare Exception for a schema mismatch
            raise UserError(f"{tok_path} is not a valid tokenizer.json ({e}).") from None
        cfg = json.loads(_read_json_text(cfg_path))
        if not isinstance(cfg, dict):
            raise UserError(f"{cfg_path} must hold a JSON object.")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # transformers' named-templates form: [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_path = d / "chat_template.jinja"
        if jinja_path.is_file():  # transformers 5 keeps it here, and prefers it
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {jinja_path}: {e}.") from None
        used = {"chat_template", "bos_token", "eos_token", "pad_token", "model_max_length", "added_tokens_decoder"}
        max_len = cfg.get("model_max_length")
        return cls(
            backend,
            chat_template=template if isinstance(template, str) else None,
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            bos_token=_token_str(cfg.get("bos_token")),
            model_max_length=max_len if isinstance(max_len, int) and max_len < UNLIMITED_LENGTH else None,
            extra_config={k: v for k, v in cfg.items() if k not in used},
        )


def _read_json_text(path: Path) -> str:
    """The file's text, after checking that it parses as JSON (a UserError names the file otherwise)."""
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    return text

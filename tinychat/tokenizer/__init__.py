"""Byte-level BPE tokenizer, ChatML chat format with tool calls, and the loss mask for chat training.

>>> tok = train_tokenizer(texts, vocab_size=8192)
>>> tok.save_pretrained("runs/x/tokenizer")  # transformers.AutoTokenizer opens it too
>>> enc = tok.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
>>> enc.ids, enc.mask  # mask: True on the tokens the model learns to produce
"""

from tinychat.tokenizer.chat import CHAT_TEMPLATE, ChatEncoding, render_chat, validate_messages
from tinychat.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer
from tinychat.tokenizer.train import TokenizerTrainConfig, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "ChatEncoding",
    "Tokenizer",
    "TokenizerTrainConfig",
    "render_chat",
    "train_tokenizer",
    "validate_messages",
]

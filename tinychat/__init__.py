"""tinychat: build your own ChatGPT, end to end, on a laptop CPU — and scale the same code up.

`from tinychat import Model, Tokenizer` is the Python entry point; the heavy modules (torch,
tokenizers) are imported on first use so `tinychat --help` stays instant.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tinychat.model import Model, ModelConfig
    from tinychat.tokenizer import Tokenizer

__all__ = ["Model", "ModelConfig", "Tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Model", "ModelConfig"):
        import tinychat.model as m

        return getattr(m, name)
    if name == "Tokenizer":
        from tinychat.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'tinychat' has no attribute {name!r}")

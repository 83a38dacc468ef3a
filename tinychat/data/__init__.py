"""Raw text in, training batches out: readers, cleaning, filters, dedup, PII scrubbing, shards, loaders.

Nothing here imports the tokenizer or the model (data sits to their left); `tokenize` takes any object
with encode_batch / eot_id / vocab_size and the CLI loads the real one lazily.
"""

from tinychat.data.readers import Document, ReadError, iter_documents, iter_texts

__all__ = ["Document", "ReadError", "iter_documents", "iter_texts"]

"""Making a trained model smaller and faster: weight-only quantization (int8/int4), pruning, low-rank factorisation."""

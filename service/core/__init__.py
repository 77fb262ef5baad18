"""The inference core: admission, extraction pool, micro-batcher, model worker (no HTTP here)."""

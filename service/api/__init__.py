"""The HTTP layer: routers, request parsing and response bodies (no tensors here)."""

"""The wire format of ``WS /v1/stream`` shared by the server and the client (docs/STREAMING.md,
"Media messages")."""

from __future__ import annotations

import struct

PROTOCOL = "cmamba.v1"
"""The subprotocol the server speaks (and accepts with)."""
TOKEN_PREFIX = "cmamba.token."
"""A subprotocol offering ``cmamba.token.<token>`` gives the bearer token."""

HEADER = struct.Struct("<B3sdI")
"""kind, 3 reserved zero bytes, timestamp (float64 seconds), payload length (uint32)."""
KIND_AUDIO = 1
KIND_VIDEO = 2


def encode_frame(kind: int, timestamp: float, payload: bytes) -> bytes:
    """One binary message: the header, then the payload."""
    return HEADER.pack(kind, b"\0\0\0", timestamp, len(payload)) + payload

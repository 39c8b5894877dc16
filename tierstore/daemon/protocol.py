"""The control-plane protocol between ``tierstored`` and its clients.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (an object).
Bulk data (ids, gradients, rows served from SCM) never goes through the socket: each client has
a shared-memory mailbox and frames only say how many elements lie there.

The first request on a connection is ``{"op": "hello", "version": N}``; the service answers with
its own version and refuses a client that speaks a newer one. Every reply is
``{"ok": true, ...}`` or ``{"ok": false, "error": "<message>", "type": "<exception class>"}``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
MAX_FRAME = 1 << 20  # bytes of JSON in one frame
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that cannot be decoded (bad length, not JSON, not an object)."""


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """Length announced by a 4-byte header; ProtocolError if over MAX_FRAME."""
    (n,) = _LEN.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes announced; the limit is {MAX_FRAME}")
    return n


def decode(body: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"frame is not UTF-8 JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(msg).__name__}")
    return msg


def error_reply(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": str(exc), "type": type(exc).__name__}

"""Opaque, URL-safe, tamper-evident page tokens for keyset pagination.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256(key, payload)[:16])``.
The payload holds the format version, a fingerprint of the query (a token only works for
the query that produced it), the sort-key values of the last row and its shard.

Without a ``secret`` the MAC key is a fixed constant: that catches corruption and casual
edits but anyone can forge a token; pass a secret to make forging infeasible.  Either
way a token is decoded strictly (types, lengths, version) before any value reaches SQL,
and values are always sent as bound parameters.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import hashlib
import hmac
import json
import uuid
from typing import Any

from ..exc import PageTokenError

__all__ = ["PageTokenError", "decode_token", "encode_token"]

_VERSION = 1
_DEFAULT_KEY = b"shardsession page token v1"
_MAC_BYTES = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def _encode_value(value: Any) -> list[Any]:
    # bool before int: bool is an int subclass.
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, int):
        return ["i", str(value)]
    if isinstance(value, float):
        return ["f", repr(value)]
    if isinstance(value, decimal.Decimal):
        return ["d", str(value)]
    if isinstance(value, str):
        return ["s", value]
    if isinstance(value, datetime.datetime):
        return ["dt", value.isoformat()]
    if isinstance(value, datetime.date):
        return ["da", value.isoformat()]
    if isinstance(value, datetime.time):
        return ["t", value.isoformat()]
    if isinstance(value, uuid.UUID):
        return ["u", str(value)]
    if isinstance(value, bytes):
        return ["y", _b64(value)]
    raise PageTokenError(
        f"cannot page on a sort key of type {type(value).__name__}", shard_id=None
    )


def _decode_value(item: Any) -> Any:
    if not isinstance(item, list) or not item or not isinstance(item[0], str):
        raise ValueError("bad value")
    tag = item[0]
    if tag == "n" and len(item) == 1:
        return None
    if len(item) != 2:
        raise ValueError("bad value")
    raw = item[1]
    if tag == "b" and isinstance(raw, bool):
        return raw
    if not isinstance(raw, str):
        raise ValueError("bad value")
    decoders: dict[str, Any] = {
        "i": int,
        "f": float,
        "d": decimal.Decimal,
        "s": str,
        "dt": datetime.datetime.fromisoformat,
        "da": datetime.date.fromisoformat,
        "t": datetime.time.fromisoformat,
        "u": uuid.UUID,
        "y": _unb64,
    }
    if tag not in decoders:
        raise ValueError("bad tag")
    return decoders[tag](raw)


def _mac(secret: bytes | None, payload: bytes) -> bytes:
    return hmac.new(secret or _DEFAULT_KEY, payload, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_token(
    fingerprint: str, values: list[Any], shard: str | None, secret: bytes | None
) -> str:
    """Encode the position after the last row of a page."""
    body = {"v": _VERSION, "q": fingerprint, "k": [_encode_value(v) for v in values], "s": shard}
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def decode_token(
    token: str, fingerprint: str, n_keys: int, secret: bytes | None
) -> tuple[list[Any], str | None]:
    """Validate and decode a token; return ``(values, shard)``.

    :raises PageTokenError: malformed, altered, or issued for another query.
    """
    if not isinstance(token, str) or len(token) > 8192 or token.count(".") != 1:
        raise PageTokenError("malformed page token", shard_id=None)
    body_text, mac_text = token.split(".")
    try:
        payload = _unb64(body_text)
        mac = _unb64(mac_text)
    except (binascii.Error, ValueError, UnicodeEncodeError) as err:
        raise PageTokenError("malformed page token", shard_id=None) from err
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        raise PageTokenError("page token was altered or signed with another key", shard_id=None)
    try:
        body = json.loads(payload.decode("utf-8"))
        if not isinstance(body, dict) or set(body) != {"v", "q", "k", "s"}:
            raise ValueError("bad fields")
        if body["v"] != _VERSION:
            raise ValueError("unknown version")
        keys = body["k"]
        if not isinstance(keys, list) or len(keys) != n_keys:
            raise ValueError("wrong number of keys")
        values = [_decode_value(k) for k in keys]
        shard = body["s"]
        if shard is not None and not isinstance(shard, str):
            raise ValueError("bad shard")
    except (ValueError, TypeError, decimal.InvalidOperation, UnicodeDecodeError) as err:
        raise PageTokenError(f"malformed page token ({err})", shard_id=None) from err
    if body["q"] != fingerprint:
        raise PageTokenError("page token belongs to a different query", shard_id=None)
    return values, shard

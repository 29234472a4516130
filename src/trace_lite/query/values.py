"""Values shared by the sandbox process and the server: JSON forms of DuckDB values, and the
Arrow IPC stream's end marker. Standard library only (the sandbox imports it before DuckDB)."""

from __future__ import annotations

import base64
import datetime
import decimal
import math
import uuid
from typing import Any

#: The Arrow IPC end-of-stream marker (continuation token, zero length).
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def jsonable(value: Any) -> Any:
    """A fetched DuckDB value as JSON (decimals, UUIDs, intervals as text; bytes base64)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal | uuid.UUID | datetime.timedelta):
        return str(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)

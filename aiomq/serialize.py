"""JSON checks for what goes into ``jsonb`` columns, and the error result of a failed job."""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["MAX_KEY_BYTES", "check_text", "dump_json", "error_result", "safe_object", "scrub_nul"]


def dump_json(value: Any, what: str) -> str:
    """Encode ``value`` as PostgreSQL ``jsonb`` can store it, or explain why it cannot.

    ``TypeError`` for what JSON cannot encode (sets, bytes, datetimes, NaN, ...); ``ValueError`` for
    strings ``jsonb`` refuses (the NUL character, lone surrogates). Checked before any SQL is sent so a
    caller's transaction stays usable.
    """
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as ex:
        raise TypeError(f"{what} cannot be stored as JSON: {ex}") from ex
    except RecursionError as ex:
        raise TypeError(f"{what} cannot be stored as JSON: it is nested too deeply") from ex
    # json.dumps escapes every non-ASCII character, so these escapes are the only way they appear.
    if "\\u0000" in text and _has_nul(value):
        raise ValueError(f"{what} contains a NUL character (\\x00), which PostgreSQL jsonb cannot store")
    if "\\ud" in text and _has_lone_surrogate(value):
        raise ValueError(f"{what} contains a lone surrogate, which PostgreSQL jsonb cannot store")
    return text


#: The longest method and cursor_key, in UTF-8 bytes. Both are in btree indexes (the collapse index holds
#: both, with the queue), whose entries PostgreSQL caps at about 2,700 bytes: a longer key would fail when
#: the job is inserted or, worse, claimed.
MAX_KEY_BYTES = 1024


def check_text(value: str, what: str, *, max_bytes: int | None = None) -> str:
    """``value`` if PostgreSQL can store it as text (and index it, within ``max_bytes``), else ``ValueError``
    (NUL, lone surrogates, too long)."""
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character (\\x00), which PostgreSQL cannot store")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone surrogate, which PostgreSQL cannot store") from None
    if max_bytes is not None and len(encoded) > max_bytes:
        raise ValueError(
            f"{what} is {len(encoded)} bytes long (UTF-8); at most {max_bytes}, as it is part of an index"
        )
    return value


def _strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _has_nul(value: Any) -> bool:
    return any("\x00" in item for item in _strings(value))


def _has_lone_surrogate(value: Any) -> bool:
    for item in _strings(value):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def scrub_nul(text: str) -> str:
    """Write NUL as the four characters ``\\x00`` and lone surrogates as ``\\udXXX``: storable text."""
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_object(value: Any, _seen: frozenset[int] = frozenset()) -> Any:
    """A JSON-safe copy: lists and mappings kept, everything else as a storable ``repr``."""
    if id(value) in _seen:
        return f"<cycle type={type(value).__name__}>"
    if isinstance(value, list | tuple):
        seen = _seen | {id(value)}
        return [safe_object(v, seen) for v in value]
    if isinstance(value, Mapping):
        seen = _seen | {id(value)}
        return {scrub_nul(str(k)): safe_object(v, seen) for k, v in value.items()}
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    try:
        return scrub_nul(repr(value))
    except Exception:
        return "<broken repr>"


def error_result(ex: BaseException) -> dict[str, Any]:
    """The result of a job whose handler raised ``ex`` (reference §12)."""
    cls = type(ex)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(ex)
    except Exception:
        message = "<broken str>"
    tb = traceback.format_exception(cls, ex, ex.__traceback__)
    return {
        "exc": name,
        "message": scrub_nul(message),
        "args": [safe_object(a) for a in ex.args],
        "tb": [scrub_nul(line) for line in tb],
    }

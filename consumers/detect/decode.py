"""What an obfuscated command line decodes to, so rules judge what runs, not how it was wrapped.

``decode_command(cmdline)`` finds the encoded literals a command decodes itself -- base64 fed to
``base64 -d`` / ``b64decode`` / ``atob`` / ``FromBase64String``, hex fed to ``xxd -r -p`` /
``unhexlify`` / ``bytes.fromhex``, ``\\xNN`` / ``\\NNN`` escapes of ``printf``, ``echo -e`` and
``$'…'`` -- decodes them, and decodes the result again (a base64 inside a base64), at most
``MAX_DEPTH`` levels and ``MAX_OUT`` characters in all. Only text that decodes to printable UTF-8
counts (random tokens that happen to be valid base64 are not "decoded"). Returns the decoded texts
joined by `` ; ``, or None when there is nothing to decode.

Detection (``prepare.py``) calls it as the SQL function ``al_decode`` on the command lines that
mention a decoder, appends the result to ``cmdline`` (so every rule runs on the decoded command
too) and keeps it in the ``decoded`` column, which alerts cite.
"""

from __future__ import annotations

import base64
import binascii
import re

MAX_DEPTH = 3
MAX_OUT = 4096
MAX_IN = 64_000

_B64_CONTEXT = re.compile(r"base64|b64decode|atob\s*\(|frombase64string|decode\(\s*['\"]base64", re.I)
_HEX_CONTEXT = re.compile(r"xxd\s+(-\S+\s+)*-r|unhexlify|fromhex|\\x[0-9a-f]{2}|\bhex\s*\(|-d\s+hex", re.I)
_B64 = re.compile(r"(?<![A-Za-z0-9+/=_-])([A-Za-z0-9+/]{16,}={0,2})(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9A-Za-z])((?:[0-9a-fA-F]{2}){8,})(?![0-9A-Za-z])")
_ESC = re.compile(r"(?:\\x[0-9a-fA-F]{2}|\\[0-7]{3}){4,}")
_PREFILTER = r"(?i)base64|b64decode|atob|frombase64|xxd|unhexlify|fromhex|\\x[0-9a-f]{2}|\\[0-7]{3}"


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < 4:
        return None
    good = sum(1 for c in text if c.isprintable() or c in "\n\t\r")
    return text if good >= 0.95 * len(text) else None


def _b64(s: str) -> str | None:
    try:
        return _printable(base64.b64decode(s + "=" * (-len(s) % 4), validate=True))
    except (binascii.Error, ValueError):
        return None


def _hex(s: str) -> str | None:
    try:
        return _printable(bytes.fromhex(s))
    except ValueError:
        return None


def _escapes(s: str) -> str | None:
    out = bytearray()
    for m in re.finditer(r"\\x([0-9a-fA-F]{2})|\\([0-7]{3})", s):
        out.append(int(m[1], 16) if m[1] else int(m[2], 8) & 0xFF)
    return _printable(bytes(out))


def _once(text: str, nested: bool = False) -> list[str]:
    """Decoded literals of ``text``; ``nested``: text that is itself a decoded payload, where an
    encoded blob needs no decoder named next to it (``base64 -d | base64 -d``)."""
    found: list[str] = []
    if _B64_CONTEXT.search(text) or nested:
        found += [d for m in _B64.finditer(text) if not re.fullmatch(r"[0-9a-fA-F]+|[A-Za-z]+", m[1])
                  and (d := _b64(m[1])) is not None]
    if _HEX_CONTEXT.search(text) or nested:
        found += [d for m in _HEX.finditer(text) if (d := _hex(m[1])) is not None]
        found += [d for m in _ESC.finditer(text) if (d := _escapes(m[0])) is not None]
    return found


def decode_command(cmdline: str | None) -> str | None:
    """The decoded payloads of ``cmdline`` (recursively, bounded), or None."""
    if not cmdline:
        return None
    out: list[str] = []
    frontier = [cmdline[:MAX_IN]]
    total = 0
    for depth in range(MAX_DEPTH):
        nxt: list[str] = []
        for text in frontier:
            for d in _once(text, nested=depth > 0):
                if total >= MAX_OUT:
                    break
                d = d[: MAX_OUT - total]
                total += len(d)
                out.append(d)
                nxt.append(d)
        if not nxt:
            break
        frontier = nxt
    return " ; ".join(out) if out else None


def register(con) -> None:
    """``al_decode(VARCHAR) -> VARCHAR`` on ``con`` (once per connection)."""
    import duckdb

    try:
        con.create_function("al_decode", decode_command, ["VARCHAR"], "VARCHAR", null_handling="special", side_effects=False)
    except (duckdb.CatalogException, duckdb.NotImplementedException, duckdb.InvalidInputException) as exc:
        if "already" not in str(exc).lower():
            raise

"""Recorded text shown on a terminal, made inert.

Everything a session recorded (commands, paths, URLs, hosts, notes) was written by the agent, so by
an attacker. Printed as is, an escape sequence in it can erase or rewrite what a terminal shows: an
approval prompt's destination, a row of `agentledger sql`, a replayed command. `printable` shows
every control character instead of sending it: C0 and C1 controls and DEL as ``\\xNN``, and the
bidirectional overrides and isolates (which reorder what is shown, "Trojan Source") as ``\\uNNNN``.
Line feeds and tabs stay (multi-line text is laid out as before).
"""

from __future__ import annotations

import re

_KEEP = "\n\t"
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}"


def printable(text: str) -> str:
    """``text`` with no character that a terminal would act on rather than show."""
    return _UNSAFE.sub(_shown, text) if _UNSAFE.search(text) else text

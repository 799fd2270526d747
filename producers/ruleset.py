"""The maintained provider ruleset redaction uses: gitleaks' default configuration, vendored.

``producers/rulesets/gitleaks.toml`` is gitleaks' ``config/gitleaks.toml`` exactly as released
(version and licence in ``producers/rulesets/README.md``); this module is its only reader. It turns
each ``[[rules]]`` entry into a `Rule` with the semantics gitleaks gives it (detect/detect.go):

* ``keywords``: the rule runs only on text that contains one of them (lower-cased), the cheap
  pre-filter gitleaks applies with Aho-Corasick; we do the same (see producers/redact.py).
* the secret is group ``secretGroup`` of the match, else its first non-empty group, else the match.
* ``entropy``: the secret's Shannon entropy must be above it.
* allowlists (the global one and each rule's): ``regexes`` tested against the secret, the match or
  the line (``regexTarget``), ``stopwords`` contained in the lower-cased secret, combined with
  ``condition`` OR (default) or AND. Criteria on file paths and commits never hold here (agent
  events have neither), so an AND allowlist that needs one never applies.

The patterns are Go RE2 syntax. `translate` rewrites the few constructs Python's ``re`` spells
differently (flags switched on in the middle of a group, POSIX classes, ``\\z``) and compiles with
``re.ASCII`` (RE2's ``\\w``, ``\\d``, ``\\s`` and ``\\b`` are ASCII). One adaptation for redaction:
the delimiter group most rules end with, ``(?:[\\x60'"\\s;]|\\\\[nr]|$)`` (a quote, space, ``;`` or
end after the secret), becomes a look-ahead for any character that cannot continue the secret, so
a key followed by ``&`` (a URL query), ``,`` ``)`` ``]`` ``}`` (code, JSON) or ``@`` (URL userinfo)
is found too and the delimiter itself is left in place. Regexes are compiled on first use: a hook
process compiles only the few rules whose keywords its text contains.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

GITLEAKS_TOML = Path(__file__).with_name("rulesets") / "gitleaks.toml"
GITLEAKS_VERSION = "8.30.1"

# What gitleaks' rules end with, and what it becomes here (see the module doc).
_GO_DELIMITER = r"""(?:[\x60'"\s;]|\\[nr]|$)"""
_DELIMITER = r"""(?=[^\w+/=.~-]|\\[nr]|$)"""

_POSIX = {"alnum": "a-zA-Z0-9", "alpha": "a-zA-Z", "digit": "0-9", "xdigit": "0-9A-Fa-f", "upper": "A-Z",
          "lower": "a-z", "space": r" \t\n\r\f\v", "punct": r"!-/:-@\[-`{-~", "word": r"\w", "blank": r" \t",
          "cntrl": r"\x00-\x1f\x7f", "graph": r"!-~", "print": r" -~", "ascii": r"\x00-\x7f"}


def shannon_entropy(s: str) -> float:
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def translate(go: str) -> str:
    """A Go RE2 pattern as a Python ``re`` pattern with the same meaning (for gitleaks' rules)."""
    out, i = _body(go, 0, top=True)
    if i != len(go):
        raise ValueError(f"unbalanced ')' at {i} in {go!r}")
    return out


def _class(go: str, i: int) -> tuple[str, int]:
    """A bracket expression starting at go[i] == '['."""
    out = ["["]
    i += 1
    if i < len(go) and go[i] == "^":
        out.append("^")
        i += 1
    if i < len(go) and go[i] == "]":
        out.append(r"\]")
        i += 1
    while i < len(go) and go[i] != "]":
        c = go[i]
        if c == "\\":
            out.append(go[i:i + 2])
            i += 2
        elif c == "[" and go.startswith("[:", i):
            end = go.index(":]", i + 2)
            out.append(_POSIX[go[i + 2:end]])
            i = end + 2
        elif c == "[":
            out.append(r"\[")
            i += 1
        else:
            out.append(c)
            i += 1
    if i >= len(go):
        raise ValueError(f"unterminated character class in {go!r}")
    out.append("]")
    return "".join(out), i + 1


def _body(go: str, i: int, top: bool = False) -> tuple[str, int]:
    """The alternatives of one group (or of the whole pattern), up to its ')' (not consumed).
    A flag group ``(?i)`` not at the very start applies, as in RE2, to the rest of the group:
    each remaining alternative is wrapped in ``(?i:...)``."""
    out: list[str] = []
    flags = None  # flags switched on in the middle of this group: wrap what follows
    start = i
    while i < len(go):
        c = go[i]
        if c == "\\":
            esc = go[i:i + 2]
            out.append(r"\Z" if esc == r"\z" else esc)
            i += 2
        elif c == "[":
            s, i = _class(go, i)
            out.append(s)
        elif c == ")":
            break
        elif c == "|":
            out.append(")|" + f"(?{flags}:" if flags else "|")
            i += 1
        elif c == "(":
            m = re.match(r"\(\?([a-zA-Z-]+)\)", go[i:])
            if m:
                if top and i == start == 0 and "-" not in m.group(1):
                    out.append(m.group(0))  # global flags at the start: the same in Python
                else:
                    if flags:
                        out.append(")")
                    flags = m.group(1)
                    out.append(f"(?{flags}:")
                i += m.end()
                continue
            m = re.match(r"\((\?(?:P?<[A-Za-z_]\w*>|:|[a-zA-Z-]+:))?", go[i:])
            opener = m.group(0)
            inner, i = _body(go, i + len(opener))
            if i >= len(go):
                raise ValueError(f"unbalanced '(' in {go!r}")
            out.append(opener.replace("(?<", "(?P<") + inner + ")")
            i += 1
        else:
            out.append(c)
            i += 1
    if flags:
        out.append(")")
    return "".join(out), i


@dataclass
class Allowlist:
    """One gitleaks allowlist: a finding it matches is not a secret."""

    regexes: tuple[re.Pattern, ...] = ()
    stopwords: tuple[str, ...] = ()
    target: str = "secret"  # secret | match | line
    condition: str = "OR"
    needs_path: bool = False  # an AND allowlist with path/commit criteria: never holds for events

    @classmethod
    def from_toml(cls, d: dict) -> "Allowlist":
        return cls(tuple(re.compile(translate(r), re.ASCII) for r in d.get("regexes", ())),
                   tuple(w.lower() for w in d.get("stopwords", ())), d.get("regexTarget") or "secret",
                   (d.get("condition") or "OR").upper(), bool(d.get("paths") or d.get("commits")))

    def allows(self, secret: str, match: str, line: str) -> bool:
        target = {"match": match, "line": line}.get(self.target, secret)
        checks = []
        if self.regexes:
            checks.append(any(r.search(target) for r in self.regexes))
        if self.stopwords:
            low = secret.lower()
            checks.append(any(w in low for w in self.stopwords))
        if self.condition == "AND":
            return not self.needs_path and bool(checks) and all(checks)
        return any(checks)


@dataclass
class Rule:
    """A secret format: where it is (regex, group), when to try it (keywords), what is not one."""

    id: str
    pattern: str  # Python syntax
    keywords: tuple[str, ...] = ()
    entropy: float = 0.0
    group: int | None = None  # None: first non-empty group, else the whole match
    allowlists: tuple[Allowlist, ...] = ()
    source: str = "gitleaks"
    rank: int = 1  # overlap resolution: lower wins (0 key blocks, 1 formats, 2-3 context, 4 generic)
    flags: int = re.ASCII
    check: object = None  # optional callable(secret, match) -> bool (own rules)
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The detector name in tokens and redaction records: the rule id in ``[a-z0-9_]``."""
        return re.sub(r"[^a-z0-9_]", "_", self.id.lower())

    @cached_property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern, self.flags)

    def secret_span(self, m: re.Match) -> tuple[int, int]:
        """Where the secret is: group ``secretGroup``, else the first non-empty group, else the
        match; without the quotes some rules capture around it (the same secret, quoted or not,
        must give the same token)."""
        if self.group is not None:
            s, e = m.span(self.group)
        else:
            s, e = m.span()
            for g in range(1, (m.re.groups or 0) + 1):
                gs, ge = m.span(g)
                if ge > gs:
                    s, e = gs, ge
                    break
        text = m.string
        if e - s >= 2 and text[s] == text[e - 1] and text[s] in "\"'`":
            s, e = s + 1, e - 1
        return s, e


def load_gitleaks(path: Path = GITLEAKS_TOML) -> tuple[list[Rule], Allowlist]:
    """gitleaks' rules (those with a content regex) and its global allowlist."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    g = cfg.get("allowlist") or {}
    global_allow = Allowlist.from_toml({"regexes": g.get("regexes", ()), "stopwords": g.get("stopwords", ())})
    rules = []
    for r in cfg.get("rules", ()):
        if not r.get("regex"):
            continue  # path-only rules (e.g. pkcs12-file): events carry no files
        pattern = translate(r["regex"]).replace(_GO_DELIMITER, _DELIMITER)
        rid = r["id"]
        rank = 4 if rid.startswith("generic") else (3 if rid.startswith("curl-") else 1)
        rules.append(Rule(rid, pattern, tuple(k.lower() for k in r.get("keywords", ())), float(r.get("entropy") or 0),
                          r.get("secretGroup") or None,
                          tuple(Allowlist.from_toml(a) for a in r.get("allowlists", ())), "gitleaks", rank,
                          description=r.get("description", "")))
    return rules, global_allow

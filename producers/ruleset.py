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
process compiles only the few rules whose keywords its text contains, and reads the patterns
already translated from ``gitleaks.json`` (made from the TOML by ``python -m agentledger.producers.ruleset``;
ignored, with a warning, if it was made from another TOML).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

log = logging.getLogger(__name__)

GITLEAKS_TOML = Path(__file__).with_name("rulesets") / "gitleaks.toml"
GITLEAKS_VERSION = "8.30.1"

# What gitleaks' rules end with, and what it becomes here (see the module doc).
_GO_DELIMITER = r"""(?:[\x60'"\s;]|\\[nr]|$)"""
_DELIMITER = r"""(?=[^\w+/=.~-]|\\[nr]|$)"""

_POSIX = {"alnum": "a-zA-Z0-9", "alpha": "a-zA-Z", "digit": "0-9", "xdigit": "0-9A-Fa-f", "upper": "A-Z",
          "lower": "a-z", "space": r" \t\n\r\f\v", "punct": r"!-/:-@\[-`{-~", "word": r"\w", "blank": r" \t",
          "cntrl": r"\x00-\x1f\x7f", "graph": r"!-~", "print": r" -~", "ascii": r"\x00-\x7f"}


# a text longer than this is searched by word starts for patterns that begin at a word boundary
LONG_TEXT = 4096
# rules whose pattern reads on from its keyword over the rest of its line (``\bcurl\b(?:.*?|...)``):
# a match from a later keyword on the line is a match from the first one, which `.*?` can stretch to
LINE_RULES = {rid: re.compile(r"(?<![A-Za-z0-9_])curl(?![A-Za-z0-9_])") for rid in ("curl-auth-header", "curl-auth-user")}
# where \b then a word character can match (RE2's \w: ASCII letters, digits, _); a word, not a position
_WORD_START = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z0-9_]+")


def _is_word(text: str, i: int) -> bool:
    """RE2's \\w at text[i] (False outside the text)."""
    if i < 0 or i >= len(text):
        return False
    c = text[i]
    return c.isascii() and (c.isalnum() or c == "_")


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

    patterns: tuple[str, ...] = ()  # Python syntax
    stopwords: tuple[str, ...] = ()
    target: str = "secret"  # secret | match | line
    condition: str = "OR"
    needs_path: bool = False  # an AND allowlist with path/commit criteria: never holds for events

    @cached_property
    def regexes(self) -> tuple[re.Pattern, ...]:
        return tuple(re.compile(p, re.ASCII) for p in self.patterns)

    @cached_property
    def _stopwords(self):
        import ahocorasick

        a = ahocorasick.Automaton()
        for w in self.stopwords:
            a.add_word(w, w)
        a.make_automaton()
        return a

    def allows(self, secret: str, match: str, line: str) -> bool:
        target = {"match": match, "line": line}.get(self.target, secret)
        checks = []
        if self.patterns:
            checks.append(any(r.search(target) for r in self.regexes))
        if self.stopwords:
            checks.append(next(self._stopwords.iter(secret.lower()), None) is not None)
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
    left_context: int = 0  # the [\w.-]{0,N}? prefix taken off the pattern (see _lazy_prefix)
    boundary: bool = False  # the leading \b taken off the pattern (see _leading_boundary)
    requires: tuple[str, ...] = ()  # the text must contain one of these for the pattern to match at all

    def finditer(self, text: str):
        """The pattern's matches, as ``re.finditer`` gives them for the original pattern.

        On a long text a pattern that starts at a word boundary is tried only at word starts, and a
        rule that reads its whole line from a keyword (`LINE_RULES`) only from the line's first match
        of it: the engine's scan would try it at every position (or every keyword), each attempt
        running to the end of the line, which is quadratic (a crafted 100 KB took 5-50 s)."""
        if not self.boundary:
            yield from self.regex.finditer(text)
            return
        if len(text) > LONG_TEXT:
            yield from self._at_word_starts(text)
            return
        search, pos, n = self.regex.search, 0, len(text)
        while pos <= n:
            m = search(text, pos)
            if m is None:
                return
            s = m.start()
            if _is_word(text, s - 1) == _is_word(text, s):  # no word boundary here: try further on
                pos = s + 1
                continue
            yield m
            pos = m.end() if m.end() > s else s + 1

    def _at_word_starts(self, text: str):
        match, pos, n = self.regex.match, 0, len(text)
        per_line = self.id in LINE_RULES
        starts = LINE_RULES[self.id] if per_line else _WORD_START
        while pos <= n:
            w = starts.search(text, pos)
            if w is None:
                return
            s = w.start()
            m = match(text, s)
            if m is not None:
                yield m
                pos = m.end() if m.end() > s else s + 1
            elif per_line:  # no match from the line's first curl: none from a later one on that line
                nl = text.find("\n", s)
                if nl < 0:
                    return
                pos = nl + 1
            else:
                pos = w.end()

    def match_start(self, text: str, start: int) -> int:
        """Where gitleaks' match starts: before the pattern's match, over the identifier characters
        its lazy prefix would have taken."""
        i, stop = start, max(0, start - self.left_context)
        while i > stop and (text[i - 1].isascii() and (text[i - 1].isalnum() or text[i - 1] in "_.-")):
            i -= 1
        return i

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


_LAZY_PREFIX = re.compile(r"^(\(\?i\))?\[\\w\.-\]\{0,(\d+)\}\?")


def _lazy_prefix(pattern: str) -> tuple[str, int]:
    """Half of gitleaks' rules start with ``[\\w.-]{0,50}?`` (the identifier before a keyword, as
    in ``MY_ADAFRUIT_KEY=``). It only moves where the match starts, never which secret it finds,
    but Python's backtracking engine tries it at every position (RE2 does not): it costs most of
    the scan. The pattern is run without it and the match is extended left afterwards over up to
    that many such characters (`Rule.match_start`), which is what allowlists of the match see."""
    m = _LAZY_PREFIX.match(pattern)
    if not m:
        return pattern, 0
    return (m.group(1) or "") + pattern[m.end():], int(m.group(2))


# gitleaks' "identifier, keyword, operator, value" template (every rule with the lazy prefix) needs
# one of its operators (=, >, :=, ||, :, =>, ?=, ,) in the text: without one, the rule is skipped.
_TEMPLATE_OPERATORS = ("=", ">", ":", "|", ",")
_LEADING_B = re.compile(r"^(\(\?i\))?\\b(?=[(\w])")


def _leading_boundary(pattern: str) -> tuple[str, bool]:
    """A pattern that starts with ``\\b`` cannot use the engine's fast scan for its first
    characters: the ``\\b`` is taken off and checked for each match instead (`Rule.boundary`)."""
    m = _LEADING_B.match(pattern)
    if not m:
        return pattern, False
    return (m.group(1) or "") + pattern[m.end():], True


def compile_gitleaks(path: Path = GITLEAKS_TOML) -> dict:
    """gitleaks' TOML as the plain data `load_gitleaks` reads: patterns translated to Python, rule
    ranks set, only what redaction uses. Written to ``gitleaks.json`` next to the TOML by
    ``python -m agentledger.producers.ruleset`` (a hook process then loads it in a millisecond instead of
    parsing TOML and translating ~250 patterns)."""
    import tomllib

    raw = Path(path).read_bytes()
    cfg = tomllib.loads(raw.decode())
    g = cfg.get("allowlist") or {}

    def allow(d: dict) -> dict:
        return {"regexes": [translate(r) for r in d.get("regexes", ())], "stopwords": [w.lower() for w in d.get("stopwords", ())],
                "target": d.get("regexTarget") or "secret", "condition": (d.get("condition") or "OR").upper(),
                "needs_path": bool(d.get("paths") or d.get("commits"))}

    rules = []
    for r in cfg.get("rules", ()):
        if not r.get("regex"):
            continue  # path-only rules (e.g. pkcs12-file): events carry no files
        rid = r["id"]
        pattern, left = _lazy_prefix(translate(r["regex"]).replace(_GO_DELIMITER, _DELIMITER))
        pattern, boundary = _leading_boundary(pattern)
        rules.append({"id": rid, "pattern": pattern, "left_context": left, "boundary": boundary,
                      "keywords": [k.lower() for k in r.get("keywords", ())], "entropy": float(r.get("entropy") or 0),
                      "group": r.get("secretGroup") or None,
                      "rank": 4 if rid.startswith("generic") else (3 if rid.startswith("curl-") else 1),
                      "allowlists": [allow(a) for a in r.get("allowlists", ())]})
    return {"source": GITLEAKS_TOML.name, "source_sha256": hashlib.sha256(raw).hexdigest(), "version": GITLEAKS_VERSION,
            "global_allowlist": allow({"regexes": g.get("regexes", ()), "stopwords": g.get("stopwords", ())}),
            "rules": rules}


def load_gitleaks(path: Path = GITLEAKS_TOML) -> tuple[list[Rule], Allowlist]:
    """gitleaks' rules (those with a content regex) and its global allowlist: from the compiled
    ``gitleaks.json`` when it was made from this very TOML, else from the TOML itself."""
    data = None
    compiled = Path(path).with_suffix(".json")
    try:
        data = json.loads(compiled.read_text())
        if data.get("source_sha256") != hashlib.sha256(Path(path).read_bytes()).hexdigest():
            log.warning("%s was not compiled from %s (run python -m agentledger.producers.ruleset): reading the TOML", compiled, path)
            data = None
    except (OSError, ValueError):
        data = None
    if data is None:
        data = compile_gitleaks(path)

    def allow(d: dict) -> Allowlist:
        return Allowlist(tuple(d["regexes"]), tuple(d["stopwords"]), d["target"], d["condition"], d["needs_path"])

    rules = [Rule(r["id"], r["pattern"], tuple(r["keywords"]), r["entropy"], r["group"],
                  tuple(allow(a) for a in r["allowlists"]), "gitleaks", r["rank"], left_context=r["left_context"],
                  boundary=r["boundary"], requires=_TEMPLATE_OPERATORS if r["left_context"] else ())
             for r in data["rules"]]
    return rules, allow(data["global_allowlist"])


if __name__ == "__main__":  # python -m agentledger.producers.ruleset: (re)compile gitleaks.json from gitleaks.toml
    out = GITLEAKS_TOML.with_suffix(".json")
    out.write_text(json.dumps(compile_gitleaks(), indent=0, sort_keys=True) + "\n")
    print(f"wrote {out}")

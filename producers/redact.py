"""Secret redaction before encoding: secrets never reach the wire, the spool or the warehouse.

Every string of an event's payload (argv items, shell strings, env names, URLs, output excerpts,
file paths, approval subjects and justifications, denial targets, errors, ...) is scanned; each
secret found is replaced in place by a token::

    [SECRET:<detector>:<hmac8>]     e.g. [SECRET:aws_access_key:9f2c41d0]

``hmac8`` is the first 8 hex digits of HMAC-SHA256(redaction key, secret). The same secret gives
the same token in every event, session and process that shares the key, so analysts can count and
join on "the same secret" without seeing it; without the key the token reveals nothing usable.
The key is configuration and never appears in an event: AGENTLEDGER_REDACTION_KEY (text), or
AGENTLEDGER_REDACTION_KEY_FILE, or ``$AGENTLEDGER_HOME/keys/redaction.key`` (32 random bytes,
created on first use, mode 0600). Each replacement is listed in the event's ``redactions`` array
(field path, detector, token), so it is visible which fields were redacted and why.

Detectors (stable names; analysts filter on them):

    private_key           PEM/OpenSSH/PGP private key blocks (the whole block), PuTTY key files
    aws_access_key        AKIA/ASIA/ABIA/ACCA/A3T… access key ids
    aws_secret_key        40-char secret keys next to an aws…secret/key name
    github_token          ghp_/gho_/ghu_/ghs_/ghr_ tokens and github_pat_ fine-grained tokens
    anthropic_key         sk-ant-api…/sk-ant-admin… keys
    openai_key            sk-…, sk-proj-…, sk-svcacct-… keys
    slack_token           xoxb-/xoxp-/xoxa-/… tokens and hooks.slack.com webhook URLs
    stripe_key            sk_live_/rk_live_/sk_test_/rk_test_ keys
    jwt                   three-part JSON Web Tokens (eyJ….eyJ….sig)
    bearer_token          Authorization: Bearer/Basic/Token credentials
    url_credentials       the password of user:password@host in any URL
    url_secret_param      ?token= / password= / api_key= / sig= … query parameter values
    password_assignment   password=… / passwd: … / --password … (argv, shell strings, env dumps, config)
    token_assignment      token= / secret= / api_key= / access_key= / client_secret= … and --token …
    high_entropy_assignment   NAME=VALUE where VALUE looks random (≥ 20 chars, Shannon entropy ≥ 3.7)

Why hand-written and not detect-secrets: detect-secrets 1.5.0 (evaluated) is a source-file scanner:
per line it runs ~25 plugins, returns secret *values* rather than spans (a private key is reported
by its header line only), its entropy and keyword plugins look for quoted strings in code, it has
no detector for Anthropic keys, ``github_pat_`` tokens, bearer headers or new-style OpenAI keys,
and it costs tens of microseconds a line -- too slow for the emit path (bench/emit.py). The patterns
below follow its maintained ones where they exist (AWS, GitHub, Slack, Stripe, JWT, private keys,
URL userinfo), and the test suite runs detect-secrets as an independent oracle over redacted events.

Speed: strings shorter than 8 characters, strings already found clean (a bounded memo: paths,
argv words and domain lists repeat a lot), and strings without any trigger (``=``, ``@``, a
``key: value`` colon, or one of the literal prefixes/keywords of the formats, tested as plain
substrings of the lower-cased text) skip the regex work entirely; that is most event strings.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from schemas.config import Settings
from schemas.homes import default_home, write_private_file
from schemas.keys import UnsafeKeyError, check_key_path

log = logging.getLogger(__name__)

REDACTION_KEY_ENV = "AGENTLEDGER_REDACTION_KEY"
REDACTION_KEY_FILE_ENV = "AGENTLEDGER_REDACTION_KEY_FILE"
REDACTION_SWITCH_ENV = "AGENTLEDGER_REDACTION"  # "off" disables (tests of raw data only)
TOKEN_PREFIX = "[SECRET:"
TOKEN_RE = re.compile(r"\[SECRET:[a-z0-9_]+:[0-9a-f]{8}\]")

# Payload fields that hold our own digests and ids, never user data.
SKIP_FIELDS = frozenset({
    "sha256", "action_digest", "digest_before", "digest_after", "workspace_digest", "env_digest",
    "stdin_digest", "response_digest", "policy_digest", "head_hash", "command_id", "request_id",
    "attempt_id", "parent_command_id", "signature", "key_id", "checkpoint_key_id", "algorithm",
})

_SECRETISH = r"(?:passw(?:or)?d|passwd|pwd|pass|secret|token|api[_-]?key|apikey|access[_-]?key|secret[_-]?key|" \
             r"client[_-]?secret|auth[_-]?token|private[_-]?key|credentials?|session[_-]?key)"
_PLACEHOLDER = re.compile(
    r"^(?:\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|<[^>]*>|\{\{.*\}\}|%\(?\w+\)?s?|\*+|x{3,}|X{3,}|\.{3,}|"
    r"(?:your|my|example|sample|dummy|placeholder|changeme|change_me|redacted|none|null|true|false|test|"
    r"secret|password|token|xxx)(?:[-_][A-Za-z0-9_-]*)?|\[SECRET:.*)$", re.IGNORECASE)
_DIGEST_NAMES = re.compile(r"(?i)(?:sha|md5|hash|digest|commit|rev|etag|checksum|integrity|uuid|id)$")


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: re.Pattern
    group: int = 0  # the secret is this group of the match (0 = whole match)
    check: Callable[[str, re.Match], bool] | None = None


def shannon_entropy(s: str) -> float:
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _not_placeholder(value: str, m: re.Match) -> bool:
    return not _PLACEHOLDER.match(value) and not value.startswith(TOKEN_PREFIX)


def _high_entropy(value: str, m: re.Match) -> bool:
    if not _not_placeholder(value, m) or _DIGEST_NAMES.search(m.group(1)):
        return False
    if value.count("/") > 2 or value.count(".") > 2:  # paths, versions, host names
        return False
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    if not (has_digit and has_alpha):
        return False
    return shannon_entropy(value) >= 3.7


DETECTORS: tuple[Detector, ...] = (
    Detector("private_key", re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)|PuTTY-User-Key-File-\d[\s\S]*?(?:Private-MAC: \S+|\Z)")),
    Detector("aws_access_key", re.compile(r"(?<![A-Z0-9])(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])")),
    Detector("aws_secret_key", re.compile(
        r"(?i)aws.{0,24}?(?:secret|key).{0,24}?[=:\s\"']\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"), 1),
    Detector("github_token", re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9_]{36,255}|github_pat_[A-Za-z0-9_]{22,255})")),
    Detector("anthropic_key", re.compile(r"(?<![A-Za-z0-9_-])sk-ant-(?:api|admin|sid|oat)\d{0,3}-[A-Za-z0-9_-]{20,}")),
    Detector("openai_key", re.compile(
        r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-|None-)?(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}")),
    Detector("slack_token", re.compile(
        r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+")),
    Detector("stripe_key", re.compile(r"(?<![A-Za-z0-9])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}")),
    Detector("jwt", re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")),
    Detector("bearer_token", re.compile(
        r"(?i)(?:\b(?:bearer|basic)\s+|authorization[\"']?\s*[:=]\s*[\"']?(?:token\s+)?)([A-Za-z0-9_\-.=+/~]{12,})"), 1,
        _not_placeholder),
    Detector("url_credentials", re.compile(r"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^/\s:@]{1,256}:([^/\s@]{1,256})@"), 1,
             _not_placeholder),
    Detector("url_secret_param", re.compile(
        r"(?i)[?&;](?:password|passwd|pwd|token|access_token|refresh_token|id_token|auth_token|api[_-]?key|apikey|key|"
        r"secret|client_secret|sig|signature|auth|sessionid|session_id|credential|x-amz-signature|x-amz-credential|"
        r"x-amz-security-token)=([^&#\s\"']{3,})"), 1, _not_placeholder),
    Detector("password_assignment", re.compile(
        r"(?i)(?:\b|_)(?:passw(?:or)?d|passwd|pwd)[\"']?(?:\s*[:=]\s*|\s+(?=[^\s=:]))[\"']?([^\s\"';]{3,})"), 1,
        _not_placeholder),
    Detector("token_assignment", re.compile(
        r"(?i)(?:\b|_)(?:token|secret|api[_-]?key|apikey|access[_-]?key|secret[_-]?key|client[_-]?secret|auth[_-]?token|"
        r"private[_-]?key|credentials?|session[_-]?key)[\"']?(?:\s*[:=]\s*|(?<=-)\s+)[\"']?([^\s\"'&;,]{6,})"), 1,
        _not_placeholder),
    Detector("high_entropy_assignment", re.compile(
        r"\b([A-Za-z_][A-Za-z0-9_.-]{0,63})[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9+/=_\-.~]{20,})"), 2, _high_entropy),
)
DETECTOR_NAMES = tuple(d.name for d in DETECTORS)

# Cheap pre-filter: a string for which this is False cannot match any detector. Plain substring tests on
# the lower-cased text (C speed, ~1 us) instead of one big regex alternation (~5 us on a 50-char path).
_TRIGGER_WORDS = ("akia", "asia", "abia", "acca", "a3t", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "sk-",
                  "k_live_", "k_test_", "xox", "eyj", "private key", "putty", "hooks.slack", "bearer", "basic ",
                  "passw", "pwd", "token", "secret", "api_key", "apikey", "api-key", "access_key", "access-key",
                  "credential", "authorization", "private_key", "session_key")
_COLON_VALUE = re.compile(r":\s*[\"']?[A-Za-z0-9+_\-][A-Za-z0-9+/=_\-.~]{19}")


def _maybe_secret(text: str) -> bool:
    if "=" in text or "@" in text:
        return True
    low = text.lower()
    for w in _TRIGGER_WORDS:
        if w in low:
            return True
    return ":" in text and _COLON_VALUE.search(text) is not None


_MIN_LEN = 8
_FLAG_SECRET = re.compile(r"^--?(?:password|passwd|pwd|pass|token|api-?key|secret|client-secret|access-key|auth-token|"
                          r"with-token|private-key|key)$", re.IGNORECASE)


def load_redaction_key(home: Path, env: dict[str, str] | None = None) -> bytes:
    """The HMAC key: from the environment (text), a key file, or ``home/keys/redaction.key``
    (created once, 0600). A key file `schemas.keys.check_key_path` refuses (inside a git work tree,
    writable or readable by others, not yours) raises `UnsafeKeyError`: never use a key someone else
    could have planted -- they could then test guesses against every token. Falls back to an
    ephemeral key (tokens then only join within this process) if none can be stored."""
    env = os.environ if env is None else env
    if env.get(REDACTION_KEY_ENV):
        return env[REDACTION_KEY_ENV].encode()
    if env.get(REDACTION_KEY_FILE_ENV):
        path = Path(env[REDACTION_KEY_FILE_ENV])
        check_key_path(path, what=f"redaction key ({REDACTION_KEY_FILE_ENV})", secret=True)
        return path.read_bytes().strip()
    return _home_redaction_key(Path(home) / "keys" / "redaction.key")


def _home_redaction_key(path: Path) -> bytes:
    what = "redaction key"
    if not path.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_key_path(path.parent, what=f"{what} directory")  # never create one where others can read it
            # A process racing us (the first hook calls of a fresh home run concurrently) sees no key
            # or the whole key, never an empty file.
            write_private_file(path, os.urandom(32).hex().encode(), exclusive=True)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except UnsafeKeyError:
            raise
        except OSError as exc:
            log.warning("cannot store a redaction key under %s (%s): using an ephemeral key", path.parent, exc)
            return os.urandom(32)
    check_key_path(path, what=what, secret=True)
    return path.read_bytes().strip()


def hook_redaction_key(home: Path, env: Mapping[str, str] | None = None) -> tuple[bytes, str | None]:
    """The key the hook redacts with, and what to say on stderr. The hook must never block the agent
    for this, never record a secret in clear and never use a refused key: when `load_redaction_key`
    refuses one, it redacts with the key of the per-user home (``$XDG_DATA_HOME/agentledger`` or
    ``~/.local/share/agentledger``), or if that is refused too (or is the refused one), with a key of
    this call only -- and says which, and why, on stderr."""
    env = os.environ if env is None else env
    try:
        return load_redaction_key(home, env), None
    except UnsafeKeyError as exc:
        refused = exc
    safe = Path(default_home(env)) / "keys" / "redaction.key"
    if safe.absolute() != Path(refused.path).absolute():
        try:
            return (_home_redaction_key(safe),
                    f"agentledger hook: {refused}\nagentledger hook: redacting with {safe} instead\n")
        except (UnsafeKeyError, OSError):
            pass
    return (os.urandom(32), f"agentledger hook: {refused}\nagentledger hook: redacting with a key of this call "
                            "only (its tokens join nothing)\n")


class Redactor:
    """Replaces secrets in event payloads by keyed-HMAC tokens and records each replacement."""

    def __init__(self, key: bytes, detectors: Iterable[Detector] = DETECTORS):
        if not key:
            raise ValueError("the redaction key must not be empty")
        self._key = key
        self.notice: str | None = None  # what the hook says on stderr about the key (see hook_redaction_key)
        self.detectors = tuple(detectors)
        self._tokens: dict[tuple[str, str], str] = {}
        self._clean: set[str] = set()  # strings already scanned and found clean (paths, argv words repeat a lot)

    def token(self, detector: str, secret: str) -> str:
        cached = self._tokens.get((detector, secret))
        if cached is None:
            digest = hmac.new(self._key, secret.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:8]
            cached = f"[SECRET:{detector}:{digest}]"
            if len(self._tokens) < 100_000:
                self._tokens[(detector, secret)] = cached
        return cached

    def scan(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """``text`` with every secret replaced, and the (detector, token) of each replacement."""
        if len(text) < _MIN_LEN or text in self._clean or not _maybe_secret(text):
            return text, []
        found: list[tuple[str, str]] = []
        for det in self.detectors:
            if det.name == "high_entropy_assignment" and "=" not in text and ":" not in text:
                continue
            pieces = []
            last = 0
            # tokens already written by an earlier detector are never matched again
            done = [t.span() for t in TOKEN_RE.finditer(text)] if found or TOKEN_PREFIX in text else ()
            for m in det.pattern.finditer(text):
                start, end = m.span(det.group)
                if start < 0:
                    continue
                if done and any(a < m.end() and m.start() < b for a, b in done):
                    continue
                value = text[start:end]
                if value.startswith(TOKEN_PREFIX) or (det.check and not det.check(value, m)):
                    continue
                tok = self.token(det.name, value)
                pieces.append(text[last:start])
                pieces.append(tok)
                last = end
                found.append((det.name, tok))
            if pieces:
                pieces.append(text[last:])
                text = "".join(pieces)
        if not found and len(self._clean) < 50_000 and len(text) < 512:
            self._clean.add(text)
        return text, found

    def redact_argv(self, argv: list[str], path: str, out: list[dict]) -> list[str]:
        res = list(argv)
        flagged = False  # the previous item was `--password`, `--token`, ...: this one is the secret
        for i, a in enumerate(res):
            if not isinstance(a, str):
                flagged = False
                continue
            if not flagged and (len(a) < _MIN_LEN or a in self._clean or not _maybe_secret(a)):
                flagged = a[:1] == "-" and bool(_FLAG_SECRET.match(a))
                continue
            new, found = self.scan(a)
            if not found and flagged and a and not a.startswith("-") and not _PLACEHOLDER.match(a):
                prev = res[i - 1].lower()
                det = "password_assignment" if "pass" in prev or "pwd" in prev else "token_assignment"
                new, found = self.token(det, a), [(det, self.token(det, a))]
            if found:
                res[i] = new
                out.extend({"field": f"{path}[{i}]", "detector": d, "token": t} for d, t in found)
            flagged = bool(_FLAG_SECRET.match(a))
        return res

    def _walk(self, value, path: str, out: list[dict]):
        if isinstance(value, str):
            new, found = self.scan(value)
            if found:
                out.extend({"field": path, "detector": d, "token": t} for d, t in found)
                return new
            return value
        if isinstance(value, dict):
            changed = None
            clean = self._clean
            for k, v in value.items():
                if type(v) is str:  # the common case, inlined: most strings take the fast path here
                    if len(v) < _MIN_LEN or k in SKIP_FIELDS or v in clean or not _maybe_secret(v):
                        continue
                    nv = self._walk(v, f"{path}.{k}", out)
                elif v is None or k in SKIP_FIELDS or isinstance(v, (int, float, bool, bytes)):
                    continue
                elif k == "argv" and isinstance(v, list):
                    nv = self.redact_argv(v, f"{path}.{k}", out)
                else:
                    nv = self._walk(v, f"{path}.{k}", out)
                if nv is not v and nv != v:
                    if changed is None:
                        changed = dict(value)
                    changed[k] = nv
            return value if changed is None else changed
        if isinstance(value, list):
            res = None
            for i, item in enumerate(value):
                if type(item) is str and (len(item) < _MIN_LEN or item in self._clean or not _maybe_secret(item)):
                    continue
                nv = self._walk(item, f"{path}[{i}]", out)
                if nv is not item and nv != item:
                    if res is None:
                        res = list(value)
                    res[i] = nv
            return value if res is None else res
        return value

    def __call__(self, record: dict) -> dict:
        """The transform the Recorder applies before encoding (returns the same dict, edited)."""
        name, payload = record["payload"]
        out: list[dict] = []
        new = self._walk(payload, "payload", out)
        if out:
            record["payload"] = (name, new)
            record["redactions"] = list(record.get("redactions") or []) + out
        return record


def default_transforms(settings: Settings, env: Mapping[str, str] | None = None, *,
                       key_fallback: bool = False) -> list[Callable[[dict], dict]]:
    """Transforms every producer applies (recorder, hooks, importers, sandbox): redaction, on by default.
    AGENTLEDGER_REDACTION=off turns it off (never do that outside tests of raw data). A refused key
    file raises `UnsafeKeyError`; with ``key_fallback`` (the hook) the key of `hook_redaction_key` is
    used instead, and the Redactor's ``notice`` says so."""
    env = os.environ if env is None else env
    if (env.get(REDACTION_SWITCH_ENV) or "on").lower() in ("off", "0", "false", "no"):
        log.warning("secret redaction is OFF (%s=off)", REDACTION_SWITCH_ENV)
        return []
    if key_fallback:
        key, notice = hook_redaction_key(settings.home, env)
        red = Redactor(key)
        red.notice = notice
        return [red]
    return [Redactor(load_redaction_key(settings.home, env))]

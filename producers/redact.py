"""Secret redaction before encoding: secrets never reach the wire, the spool, the producer state or
the warehouse.

Every string of an event -- the payload (argv items, shell strings, URLs, output excerpts, paths,
approval subjects, denial targets, errors, ids, ...) and the envelope (``tool_call_id``,
``turn_id``, the trace context, the producer fields) -- is scanned; each secret found is replaced
in place by a token::

    [SECRET:<detector>:<hmac8>]     e.g. [SECRET:gitlab_pat:9f2c41d0]

``hmac8`` is the first 8 hex digits of HMAC-SHA256(redaction key, secret). The same secret gives
the same token in every event, session and process that shares the key, so analysts can count and
join on "the same secret" without seeing it; without the key the token reveals nothing usable.
The key is configuration and never appears in an event (`load_redaction_key`). Each replacement is
listed in the event's ``redactions`` array (field path, detector = the rule that matched, token).

Ids that come from the agent (session, turn and tool call ids) are redacted with `Redactor.redact_id`
where they enter (the hook's input, each line an importer reads) and again wherever they are used,
so an id carrying a secret becomes the same token in the envelope, the payload's command / request
/ attempt ids, the producer state's fact keys and the hook's open calls: the hook's and an
importer's records of one call still merge as one fact.

Rules (docs/agents.md, "Secret redaction", lists them with the measured recall):

* **Provider formats: gitleaks' default ruleset**, vendored as a data file (producers/ruleset.py,
  producers/rulesets/): ~220 maintained patterns with their keywords, entropy thresholds and
  allowlists (GitLab ``glpat-``, Google ``AIza``, AWS, GitHub, Slack, Stripe, npm, PyPI, ...).
* **Own rules** for what a provider list cannot know: private key blocks cut short by an output
  excerpt, looser variants of the common provider prefixes (``sk-``, ``sk-ant-``, ``ghp_``...),
  ``NAME=value`` / ``"name": "value"`` / ``name: value`` assignments whose name says secret
  (``PGPASSWORD``, ``MYSQL_PWD``, ``*_TOKEN``, ``*_SECRET``, ``*_KEY``, ``password``, ...), URL
  userinfo and secret query parameters, ``Authorization:`` / ``X-Api-Key:`` / ``Cookie:`` headers.
* **argv rules** (`argv_secrets`): secret-taking flags of any program (``--password X``,
  ``--token=X``, ``--client-secret X``, ``-storepass X``...) and of known programs (``mysql -pX``,
  ``curl -u user:pass``, ``sshpass -p X``, ``docker login -p X``, ``redis-cli -a X``,
  ``PGPASSWORD=x psql``, ``gh secret set N --body X``, ``npm config set //r/:_authToken X``...),
  with the secret in the same argv item or the next one; applied to argv lists and to shell
  strings (split into words the way a POSIX shell does).
* **Encoded forms**: text with ``%XX`` escapes or backslash escapes (JSON inside JSON strings,
  ``\\u0040``; each up to three levels deep) is also scanned decoded, and so is text with shell line
  continuations (a secret continued on the next line after a backslash) joined, and text without
  invisible characters (format characters: ``\\u200b``, a soft hyphen...) and in NFKC form
  (fullwidth letters); a secret found
  there is replaced in the original text, and its token is that of the decoded secret (so
  ``p%40ss`` and ``p@ss`` join). A base64 (or base64url) run that decodes to text holding a secret
  (``echo cGFzc3dvcmQ9… | base64 -d``) is replaced whole, by the token of the decoded secret.
* **One event, one secret, one token**: a secret found in one field of an event is replaced
  wherever else it occurs in that event; a command's argv that is its shell string split into
  words (the hook's) is split again from the redacted string -- the words lose the quotes and the
  context that made the secret recognisable.

Placeholders (``$VAR``, ``<token>``, ``your-api-key``, ``changeme``) are left alone only as a whole
value (``test_Sup3rS3cretPw`` is a secret), and so is text a token of this redactor replaced; a
token it did not issue (``[SECRET:x:00000000]`` glued to a secret) is read like any text.

Overlaps: text that several rules match is replaced once, as the union of their matches (nothing
any rule flagged stays readable), named after the best rule: private key blocks first, then
provider formats, then context rules (assignments, flags, headers, URLs), then generic ones
(gitleaks' ``generic-api-key``, high-entropy assignments); within a rank the longer match.

Speed: strings shorter than 8 characters, strings already found clean (a bounded memo: paths, argv
words and domain lists repeat a lot), and strings containing none of the rules' keywords (one
Aho-Corasick pass over the lower-cased text, as gitleaks does) skip the regex work; that is most
event strings. A rule's regex is compiled the first time its keywords are seen.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import quote, unquote

import ahocorasick

from agentledger.schemas import envvars
from agentledger.schemas.config import Settings
from agentledger.schemas.homes import default_home, write_private_file
from agentledger.schemas.keys import UnsafeKeyError, check_key_path

from .normalize import split_shell
from .ruleset import Allowlist, Rule, load_gitleaks, shannon_entropy

log = logging.getLogger(__name__)

REDACTION_KEY_ENV = "AGENTLEDGER_REDACTION_KEY"
REDACTION_KEY_FILE_ENV = "AGENTLEDGER_REDACTION_KEY_FILE"
REDACTION_SWITCH_ENV = "AGENTLEDGER_REDACTION"  # "off" disables (tests of raw data only)
TOKEN_PREFIX = "[SECRET:"
TOKEN_RE = re.compile(r"\[SECRET:[a-z0-9_]+:[0-9a-f]{8}\]")

# Payload fields that hold our own digests, signatures and enums, never user data.
SKIP_FIELDS = frozenset({
    "sha256", "action_digest", "digest_before", "digest_after", "workspace_digest", "env_digest",
    "stdin_digest", "response_digest", "policy_digest", "arguments_digest", "head_hash", "signature", "key_id", "checkpoint_key_id",
    "algorithm",
})
# Payload fields that hold ids (some from the agent): redacted as ids, like the envelope's.
ID_FIELDS = frozenset({"command_id", "request_id", "attempt_id", "parent_command_id", "grant_request_id"})
# Keys under which agent records (hook input, rollout lines, OTel attributes) carry ids.
ID_KEYS = frozenset({
    "id", "session_id", "sessionId", "conversation_id", "conversationId", "thread_id", "threadId", "call_id", "callId",
    "turn_id", "turnId", "tool_use_id", "toolUseId", "tool_call_id", "toolCallId", "item_id", "request_id",
    "parent_id", "conversation.id", "session.id", "thread.id", "turn.id", "tool.use_id", "tool.call_id", "call.id",
})

# A placeholder is a whole value that stands for a secret without being one: a variable or template
# reference, a redaction mask, or words that say "put the secret here" (``your-api-key``,
# ``changeme``, ``YOUR_TOKEN_HERE``). The words form the whole value, in one case, with no digit:
# ``test_Sup3rS3cretPw`` or ``token_9f8a7b6c`` begins with such a word but is a secret. One of our
# tokens is a placeholder only whole: text glued to a (forged) token is still read.
_PLACEHOLDER_START = ("your|my|example|sample|dummy|placeholder|changeme|change|redacted|none|null|nil|true|false|test|"
                      "secret|password|passwd|token|xxx|fake|insert|enter|put|replace")
_PLACEHOLDER_WORD = (_PLACEHOLDER_START + "|me|here|goes|value|api|key|access|auth|client|id|app|user|username|name|"
                     "pass|pwd|string|the|a|an|to|be|replaced|with|real|own|actual|default|foo|bar|demo|personal|private|"
                     "new|this|of|for|x+")


def _placeholder_words(start: str, word: str) -> str:
    """Placeholder words joined by ``-`` or ``_``, the first of them one of ``start``."""
    return rf"(?:{start})(?=[-_]|\Z)(?:[-_]++(?:{word})(?=[-_]|\Z))*+[-_]*+"


_PLACEHOLDER = re.compile(
    r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\$\((?:[^()\n]|\([^()\n]*\))*\)|<[^<>\n]*>|\$?\{\{(?:[^{}\n]|\{[^{}\n]*\})*\}\}|"
    r"%\(\w+\)[sdr]|%[sdr]|%[A-Za-z_][A-Za-z0-9_]*%|\*+|x{3,}|X{3,}|\.{3,}|-|"
    + _placeholder_words(_PLACEHOLDER_START, _PLACEHOLDER_WORD) + "|"
    + _placeholder_words(_PLACEHOLDER_START.upper(), _PLACEHOLDER_WORD.upper()) + "|"
    rf"(?i:{_PLACEHOLDER_START}|undefined|empty)|"  # None, True, Changeme: one word, any case
    r"\[SECRET:[a-z0-9_]+:[0-9a-f]{8}\]")
_DIGEST_NAMES = re.compile(r"(?i)(?:sha\d*|md5|h1|blake\w*|xxh\w*|crc\d*|hash|digest|commit|rev|etag|checksum|integrity|"
                           r"uuid|id)$")
# hex digests, git SHAs, UUIDs, W3C trace ids: hex, maybe in dash- or colon-separated groups
_HEXISH = re.compile(r"(?i)^(?=(?:[-:]?[0-9a-f]){16})[0-9a-f]{2,}(?:[-:][0-9a-f]{2,})*$")


def _looks_like_digest(value: str) -> bool:
    """A git SHA, a UUID or a hex / base64 content digest: what generic rules must not take for a secret."""
    return bool(_HEXISH.match(value) or _DIGEST_VALUE.match(value))
_DIGEST_VALUE = re.compile(r"(?i)^(?:sha(?:1|224|256|384|512)|md5|blake2[bs]?|b3|xxh\d*)[:-][0-9a-z+/=_-]{16,}$")
_PATHLIKE = re.compile(r"^(?:~|\.{1,2})?/[^\s:]*$|^[A-Za-z]:\\")


def _not_placeholder(value: str, m: re.Match | None = None) -> bool:
    return _PLACEHOLDER.fullmatch(value) is None


# -- own rules ----------------------------------------------------------------------------------
# The patterns start with a literal or a small set of characters (an operator, "://", a keyword),
# never with a look-behind or a name of any length: Python's engine then skips most of a long text
# in C instead of trying the pattern at every position. Names and boundaries are checked after.
# the name before an operator, matched on the reversed text: operator, blanks, a quote, blanks, name
_NAME_REVERSED = re.compile(r"(?:=:|=|:)[ \t]*[\"']?[ \t]*([\w.-]{1,80})")
_PASSWORD_NAME = re.compile(r"(?i)(?:(?:^|[_.-])(?:pass|pwd)|passw(?:or)?d|passphrase)$|(?-i:[a-z0-9](?:Pass|Pwd))$")
_TOKEN_NAME = re.compile(
    r"(?i)(?:token|secret|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|client[_-]?secret|credentials?|"
    r"auth[_-]?key|session[_-]?key|(?:^|[_.-])(?:key|auth|pat|dsn|cookie|sig))$|(?-i:[a-z0-9](?:Key|Auth|Pat|Dsn|Cookie))$")
_NOT_SECRET_NAME = re.compile(
    r"(?i)(?:^|[_.-])(?:public|pub|publishable|primary|foreign|sort|partition|cache|hash|idempotency|sequence|schema|"
    r"natural|bucket|range|routing|dedup|lookup|map|group|index|unique|composite|shard|row|object|gpg|ssh)[_.-]?key$|"
    r"(?:^|[_.-])(?:next[_.-]?page|page|continuation|pagination|cursor|sync|csrf[_.-]?cookie)[_.-]?token$|"
    r"nextpagetoken$|pagetoken$|^(?:old)?pwd$|^keys?$|^auth$|^token$|^sig$")
_ENTROPY_VALUE = re.compile(r"^[A-Za-z0-9+/=_\-.~]{20,}$")
_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")


def _entropy_at_least(value: str, bits: float) -> bool:
    """``shannon_entropy(value) >= bits``; a value of fewer than 2**bits distinct characters cannot
    reach it, which a set tells much faster than the count (a crafted ``token=token=…`` line
    asks this of hundreds of characters at every '=')."""
    return len(set(value)) >= 2 ** bits and shannon_entropy(value) >= bits


def secret_name_kind(name: str) -> str | None:
    """"password" or "token" when a variable / key / flag name says it holds a secret, else None."""
    if _PASSWORD_NAME.search(name):
        return "password"
    if _TOKEN_NAME.search(name):
        return "token"
    return None


def env_secrets(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(detector, value) of the environment variables whose name says they hold a secret
    (`secret_name_kind`: ``GITHUB_TOKEN``, ``DB_PASSWORD``, ``TOKEN``; not ``CACHE_KEY``,
    ``NEXT_PAGE_TOKEN``) and whose value could be one (8 characters or more, not a path, a
    placeholder or a digest). A program prints such a value bare, with nothing around it that a
    rule could recognise (``echo $TOKEN``): the sandbox, which hands the environment to the command,
    gives these to `Redactor.add_known_secrets`."""
    out = []
    for name, value in env.items():
        kind = secret_name_kind(name)
        if kind is None or not isinstance(value, str) or len(value) < _MIN_LEN:
            continue
        low = name.lower()
        if _NOT_SECRET_NAME.search(low) and low not in ("token", "auth", "key", "sig"):
            continue
        if _PATHLIKE.match(value) or _DIGEST_VALUE.match(value) or not _not_placeholder(value) or value.isdigit():
            continue
        out.append((f"{kind}_assignment", value))
    return out


def _name_before(text: str, pos: int) -> str | None:
    """The identifier before the operator that ends at ``pos``, past a closing quote and blanks."""
    m = _NAME_REVERSED.match(text[max(0, pos - 90):pos][::-1])
    if not m:
        return None
    name = m.group(1)[::-1].lstrip(".-")
    return name if name[:1].isalpha() or name[:1] == "_" else None


def _assignment(value: str, m: re.Match) -> str | bool:
    """``NAME<op>VALUE``: password_assignment / token_assignment when the name says secret,
    high_entropy_assignment when the value looks random under any other name."""
    name = _name_before(m.string, m.end())
    if name is None or not _not_placeholder(value):
        return False
    kind = secret_name_kind(name)
    low = name.lower()
    if kind is not None:
        if len(value) < (3 if kind == "password" else 6) or _DIGEST_VALUE.match(value):
            return False
        if _NOT_SECRET_NAME.search(low):
            # bare "key", "token", "auth" and the like: only values that look random
            if not (low in ("key", "keys", "token", "auth", "sig") and len(value) >= 16 and _entropy_at_least(value, 3.5)):
                return False
        elif _PATHLIKE.match(value) and re.search(r"(?i)(?:key|credentials?|cert|file|dsn)$", low):
            return False  # SSH_KEY=~/.ssh/id_ed25519, GOOGLE_APPLICATION_CREDENTIALS=/etc/x.json
        return f"{kind}_assignment"
    if not _ENTROPY_VALUE.match(value) or _DIGEST_NAMES.search(name) or _looks_like_digest(value):
        return False
    if value.count("/") > 2 or value.count(".") > 2:  # paths, versions, host names
        return False
    if _DIGIT.search(value) is None or _LETTER.search(value) is None:
        return False
    return "high_entropy_assignment" if _entropy_at_least(value, 3.7) else False


def _env_value(value: str, m: re.Match) -> bool:
    """{"name": "DB_PASSWORD", "value": "..."}: the name says secret."""
    return secret_name_kind(m.group(1)) is not None and not _NOT_SECRET_NAME.search(m.group(1).lower()) and \
        len(value) >= 3 and _not_placeholder(value)


def _word_start(value: str, m: re.Match) -> bool:
    """The keyword the pattern starts with begins a word, and the value is not a placeholder."""
    s = m.start()
    return (s == 0 or not (m.string[s - 1].isalnum() or m.string[s - 1] in "_-")) and _not_placeholder(value)


def _url_password(value: str, m: re.Match) -> bool:
    return _SCHEME_BEFORE.search(m.string, max(0, m.start() - 21), m.start()) is not None and _not_placeholder(value)


def _userinfo_ok(value: str, m: re.Match) -> bool:
    """user@ alone in a URL: a secret when it looks like a token (https://<token>@github.com)."""
    return _url_password(value, m) and len(value) >= 16 and any(c.isdigit() for c in value) and \
        _entropy_at_least(value, 3.5) and not re.fullmatch(r"[a-z][a-z0-9._-]*", value)


_SCHEME_BEFORE = re.compile(r"(?i)(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{1,20}\Z")


def _own(name: str, pattern: str, keywords: Iterable[str], rank: int, *, group: int | None = None, check=None,
         description: str = "", value_groups: tuple[int, ...] = (), requires: tuple[str, ...] = ()) -> Rule:
    """One of our rules. ``value_groups``: the secret is the first of these groups that matched.
    ``check(secret, match)`` may refuse a finding (False) or name its detector (a string).
    ``requires``: the rule is skipped for text without any of these."""
    return Rule(name, pattern, tuple(keywords), 0.0, group, (), "agentledger", rank, re.ASCII, check, description,
                {"value_groups": value_groups} if value_groups else {}, requires=requires)


_AWS_PREFIXES = ("akia", "asia", "abia", "acca", "a3t")
_VALUE = r"""(?:"([^"\n]{1,500})"|'([^'\n]{1,500})'|([^\s"'`;&|,<>(){}\[\]]{1,500}))"""
_ENV_NAME = r"([A-Za-z_][\w.-]{0,79})"
OWN_RULES: tuple[Rule, ...] = (
    _own("private_key",
         r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
         r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)|PuTTY-User-Key-File-\d[\s\S]*?(?:Private-MAC: \S+|\Z)",
         ("private key", "putty-user-key-file"), 0, description="PEM / OpenSSH / PGP private key blocks, whole or cut short"),
    _own("aws_access_key", r"(?<![A-Z0-9])(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])", _AWS_PREFIXES, 1),
    _own("github_token", r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9_]{36,255}|github_pat_[A-Za-z0-9_]{22,255})",
         ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), 1),
    _own("anthropic_key", r"(?<![A-Za-z0-9_-])sk-ant-(?:api|admin|sid|oat)\d{0,3}-[A-Za-z0-9_-]{20,}", ("sk-ant-",), 1),
    _own("openai_key", r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-|None-)?(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}",
         ("sk-",), 1),
    _own("slack_token", r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}|"
                        r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+",
         ("xox", "hooks.slack.com"), 1),
    _own("stripe_key", r"(?<![A-Za-z0-9])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}", ("_live_", "_test_"), 1),
    _own("jwt", r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", ("eyj",), 1),
    _own("aws_secret_key",
         r"(?i)aws.{0,24}?(?:secret|key).{0,24}?[=:\s\"']\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])", ("aws",), 2, group=1),
    _own("bearer_token",
         r"(?i:bearer|basic)\s+([A-Za-z0-9_\-.=+/~]{12,})|"
         r"(?i:(?:proxy-)?authorization)[\"']?\s*[:=]\s*[\"']?(?i:token\s+|bearer\s+|basic\s+)?([A-Za-z0-9_\-.=+/~]{12,})",
         ("bearer", "basic", "authorization"), 2, check=_word_start),
    _own("api_key_header",
         r"(?i:x-api-key|api-key|x-api-token|x-auth-token|x-access-token|private-token|x-gitlab-token|"
         r"x-vault-token|x-goog-api-key|ocp-apim-subscription-key|x-functions-key|x-amz-security-token|x-csrf-token|"
         r"x-xsrf-token|(?:set-)?cookie)[\"']?\s*:\s*[\"']?([^\s\"'\\][^\n\r\"'\\]{5,})",
         ("api-key", "api-token", "auth-token", "access-token", "private-token", "gitlab-token", "vault-token",
          "subscription-key", "functions-key", "security-token", "csrf-token", "xsrf-token", "cookie"), 2, group=1,
         check=_word_start),
    _own("url_credentials", r"://[^/\s:@\"'<>]{0,256}:([^/\s@\"'<>]{1,256})@", ("://",), 2, group=1, check=_url_password),
    _own("url_credentials", r"://([^/\s:@\"'<>]{16,256})@", ("://",), 2, group=1, check=_userinfo_ok),
    _own("url_secret_param",
         r"[?&;](?i:password|passwd|pwd|token|access_token|refresh_token|id_token|auth_token|api[_-]?key|apikey|key|"
         r"secret|client_secret|sig|signature|auth|sessionid|session_id|credential|x-amz-signature|x-amz-credential|"
         r"x-amz-security-token|private_token|code)=([^&#\s\"']{3,})",
         ("passw", "pwd", "token", "key", "secret", "sig", "auth", "session", "credential", "code="), 2, group=1,
         check=_not_placeholder),
    _own("env_value",  # {"name": "DB_PASSWORD", "value": "..."} and its YAML form (Kubernetes, ECS, Actions)
         r"(?i:name|key)[\"']?\s*+[:=]\s*+[\"']?" + _ENV_NAME +
         r"[\"']?(?:\s*+,\s*+|[ \t\r\f\v]*+\n\s*+(?:-\s*+)?)[\"']?(?i:value)[\"']?\s*+[:=]\s*+" + _VALUE,
         ("name", "key"), 2, check=_env_value, value_groups=(2, 3, 4), requires=("=", ":")),
    # NAME=value, NAME: value, "name": "value", -Dname=value: the name ends in a secret word (the
    # whole name is checked by `_assignment`); any other name when the value looks random. (Look-
    # aheads: the value is not consumed, so `--from-literal=password=X` is seen at both '='.)
    _own("token_assignment",
         r"(?i:passw(?:or)?d|passwd|passphrase|pass|pwd|token|secret|key|auth|credentials?|pat|dsn|cookie|sig)"
         r"[\"']?[ \t]*(?::=|=|:)(?=[ \t]*" + _VALUE + ")",
         ("pass", "pwd", "token", "secret", "key", "auth", "credential", "pat", "dsn", "cookie", "sig"), 2,
         check=_assignment, value_groups=(1, 2, 3), requires=("=", ":")),
    # (High entropy: '=' only as padding at the end of the value, so that the values of two operators
    # never overlap: ``a=a=a=…`` costs one pass, not one pass per '='.)
    _own("high_entropy_assignment", r"(?::=|=|:)(?=[ \t]*+[\"']?([A-Za-z0-9+/_\-.~]{20,}+=*+))", ("=", ":"), 4,
         check=_assignment, group=1),
)
_RANK_OF = {"high_entropy_assignment": 4}  # a check may rename a finding: its rank then


# -- argv rules ---------------------------------------------------------------------------------
_SECRET_FLAG = re.compile(
    r"^-{1,2}(?!(?:no|ask|prompt|skip|with|show|print|require|allow|disable|enable|generate|gen|check|verify|reset|"
    r"rotate|revoke|expire|refresh|list|get|delete|remove|use)[-_])(?:[a-z0-9]+[-_.])*"
    r"(password|passwd|passphrase|pass|pwd|token|secret|api-?key|apikey|access-?key|secret-?key|private-?key|"
    r"client-?secret|credentials?|auth|pat|storepass|keypass|srcstorepass|deststorepass|srckeypass|destkeypass|"
    r"bearer|oauth2-bearer)$", re.IGNORECASE)
# Programs whose short flags take a secret: flag -> (kind, attached allowed, next word allowed)
_MYSQL = {"-p": ("password", True, True)}
_PROGRAMS: dict[str, dict[str, tuple[str, bool, bool]]] = {
    "mysql": _MYSQL, "mariadb": _MYSQL,
    "sshpass": {"-p": ("password", True, True)},
    "mongo": {"-p": ("password", True, True)},
    "redis-cli": {"-a": ("password", True, True)},
    "sqlcmd": {"-P": ("password", True, True)}, "bcp": {"-P": ("password", True, True)},
    "osql": {"-P": ("password", True, True)}, "isql": {"-P": ("password", True, True)},
    "zip": {"-P": ("password", False, True)}, "unzip": {"-P": ("password", False, True)},
    "zipcloak": {"-P": ("password", False, True)},
    "7z": {"-p": ("password", True, False)}, "7za": {"-p": ("password", True, False)},
    "7zr": {"-p": ("password", True, False)}, "rar": {"-p": ("password", True, False)},
    "unrar": {"-p": ("password", True, False)},
    "ldap": {"-w": ("password", False, True)},
    "ssh-keygen": {"-N": ("password", False, True), "-P": ("password", False, True)},
    "curl": {"-u": ("userpass", True, True), "--user": ("userpass", False, True), "-U": ("userpass", True, True),
             "--proxy-user": ("userpass", False, True)},
    "http": {"-a": ("userpass", True, True), "--auth": ("userpass", False, True)},
    "smbclient": {"-U": ("userpct", True, True), "--user": ("userpct", False, True)},
    "login": {"-p": ("password", True, True), "--password": ("password", False, True)},
    "gh-secret": {"-b": ("token", True, True), "--body": ("token", False, True)},
    "openssl": {"-k": ("password", False, True)},
}
_PROGRAM_ALIASES = {"mysqldump": "mysql", "mysqladmin": "mysql", "mysqlimport": "mysql", "mysqlshow": "mysql",
                    "mysqlcheck": "mysql", "mysqlpump": "mysql", "mysqlsh": "mysql", "mysqlslap": "mysql",
                    "mariadb-dump": "mariadb", "mariadb-admin": "mariadb", "mongosh": "mongo", "mongodump": "mongo",
                    "mongorestore": "mongo", "mongoexport": "mongo", "mongoimport": "mongo", "mongostat": "mongo",
                    "mongotop": "mongo", "https": "http", "xh": "http", "xhs": "http", "rpcclient": "smbclient",
                    "smbmap": "smbclient", "ldapsearch": "ldap", "ldapadd": "ldap", "ldapmodify": "ldap",
                    "ldapdelete": "ldap", "ldapwhoami": "ldap", "ldappasswd": "ldap", "ldapcompare": "ldap",
                    "ldapmodrdn": "ldap"}
_SEGMENT_BREAK = None  # shell_words marks ; | & && || newlines ( ) with it


def _program(word: str) -> str | None:
    base = word.rsplit("/", 1)[-1].lower()
    base = _PROGRAM_ALIASES.get(base, base)
    return base if base in _PROGRAMS or base in ("htpasswd", "xfreerdp", "sqlplus", "vault", "gh", "set") else None


def _flag_kind(name: str) -> str:
    low = name.lower()
    return "password_flag" if ("pass" in low or "pwd" in low) else "token_flag"


def argv_secrets(words: list[str | None]) -> list[tuple[int, int, int, str]]:
    """Secrets that argv syntax reveals: ``(word index, start, end, detector)`` for each.

    ``words``: argv items, or the words of a shell string with ``None`` between commands."""
    out: list[tuple[int, int, int, str]] = []
    # programs seen in the current command (wrappers and docker exec ... mysql alike), each once, the
    # last seen last (a crafted `gh gh gh …` line must not make every word cost the whole line)
    progs: list[str] = []
    breaks: list[int] | None = None  # for each word, where its command ends (htpasswd's last word)
    skip = -1
    for i, w in enumerate(words):
        if w is None:
            progs = []
            continue
        if i <= skip:
            continue
        nxt = words[i + 1] if i + 1 < len(words) else None
        prev = words[i - 1].lower() if i and words[i - 1] is not None else ""
        if not w.startswith("-"):
            prog = _program(w)
            if prog == "set":
                if prev in ("config", "configure"):
                    _seen_program(progs, "set")  # npm config set K V, aws configure set K V, git config set K V
                elif prev == "secret" and "gh" in progs:
                    _seen_program(progs, "gh-secret")
            elif prog:
                _seen_program(progs, prog)
            # positional forms
            if "set" in progs and progs[-1] == "set" and _secret_name(w) and nxt is not None and _secretish(nxt):
                kind = "password_assignment" if re.search(r"(?i)pass|pwd", w) else "token_assignment"
                out.append((i + 1, 0, len(nxt), kind))  # npm config set //r/:_authToken X
                skip = i + 1
            elif "sqlplus" in progs and "/" in w and not w.startswith("/"):
                m = re.match(r"[^/@\s]+/([^@\s]+)", w)
                if m and _secretish(m.group(1)):
                    out.append((i, m.start(1), m.end(1), "password_flag"))
            elif "xfreerdp" in progs and w.lower().startswith("/p:") and _secretish(w[3:]):
                out.append((i, 3, len(w), "password_flag"))
            elif progs and progs[-1] == "login" and "vault" in progs and "=" not in w and _secretish(w) and len(w) >= 8:
                out.append((i, 0, len(w), "token_flag"))
            continue
        # flags: program-specific first
        handled = False
        for p in reversed(progs):
            table = _PROGRAMS.get(p)
            if not table:
                continue
            for flag, (kind, attached, separate) in table.items():
                if w == flag and separate and nxt is not None and _secretish(nxt, kind):
                    out.extend(_split_kind(i + 1, nxt, 0, kind))
                    skip, handled = i + 1, True
                elif attached and len(flag) == 2 and w.startswith(flag) and len(w) > 2 and _secretish(w[2:], kind):
                    out.extend(_split_kind(i, w, 2, kind))
                    handled = True
                elif flag.startswith("--") and w.startswith(flag + "=") and _secretish(w[len(flag) + 1:], kind):
                    out.extend(_split_kind(i, w, len(flag) + 1, kind))
                    handled = True
                if handled:
                    break
            if handled:
                break
        if handled:
            continue
        if "htpasswd" in progs and re.fullmatch(r"-[a-zA-Z]*b[a-zA-Z]*", w):
            if breaks is None:
                breaks = _command_ends(words)
            j = breaks[i] - 1
            if j > i and words[j] is not None and not words[j].startswith("-") and _secretish(words[j]):
                out.append((j, 0, len(words[j]), "password_flag"))
            continue
        name, eq, value = w.partition("=")
        m = _SECRET_FLAG.match(name)
        if not m:
            continue
        if eq:
            if _flag_value_ok(m.group(1), value):
                out.append((i, len(name) + 1 + _pass_prefix(value), len(w), _flag_kind(m.group(1))))
        elif nxt is not None and _flag_value_ok(m.group(1), nxt):
            out.append((i + 1, _pass_prefix(nxt), len(nxt), _flag_kind(m.group(1))))
            skip = i + 1
    return out


def _seen_program(progs: list[str], prog: str) -> None:
    if prog in progs:
        progs.remove(prog)
    progs.append(prog)


def _command_ends(words: list[str | None]) -> list[int]:
    """For each word, the index of the next command break (``None``) after it, or ``len(words)``."""
    ends, nxt = [0] * len(words), len(words)
    for i in range(len(words) - 1, -1, -1):
        ends[i] = nxt
        if words[i] is None:
            nxt = i
    return ends


def _pass_prefix(value: str) -> int:
    """openssl's ``pass:SECRET`` argument: the secret starts after the prefix."""
    return 5 if value.startswith("pass:") else 0


def _secret_name(word: str) -> bool:
    name = re.split(r"[:/]", word)[-1] or word
    return secret_name_kind(name) is not None and not _NOT_SECRET_NAME.search(name.lower())


def _secretish(value: str, kind: str = "password") -> bool:
    if not value or value.startswith("-") or not _not_placeholder(value):
        return False
    if kind == "userpass":
        _, sep, pw = value.partition(":")
        return bool(sep and pw) and _not_placeholder(pw)
    if kind == "userpct":
        _, sep, pw = value.partition("%")
        return bool(sep and pw)
    return True


def _split_kind(i: int, word: str, start: int, kind: str) -> list[tuple[int, int, int, str]]:
    if kind == "userpass":  # user:password -- the user stays readable
        cut = word.index(":", start) + 1
        return [(i, cut, len(word), "basic_auth")]
    if kind == "userpct":  # smbclient -U user%password
        cut = word.index("%", start) + 1
        return [(i, cut, len(word), "basic_auth")]
    return [(i, start, len(word), "password_flag" if kind == "password" else "token_flag")]


def _flag_value_ok(flag: str, value: str) -> bool:
    if not value or value.startswith("-") or not _not_placeholder(value):
        return False
    if value.startswith(("env:", "file:", "fd:")) or value == "stdin":  # openssl's indirections
        return False
    if re.search(r"(?i)credential|private|key$", flag) and _PATHLIKE.match(value):
        return False  # --private-key ~/.ssh/id_rsa, --credentials ./creds.json
    return True


_FLAG_TRIGGER = re.compile(r"-{1,2}[\w.-]*?(?:pass|pwd|token|secret|key|auth|cred|bearer|pat)", re.IGNORECASE)
_PROGRAM_AT = re.compile(
    r"(?:mysql\w*|mariadb\S*|sshpass|mongo\w*|redis-cli|sqlcmd|bcp|osql|isql|zip|unzip|zipcloak|7z\w?|u?nrar|ldap\w+|"
    r"ssh-keygen|login|smbclient|rpcclient|smbmap|curl|https?|xhs?|htpasswd|xfreerdp|openssl|sqlplus|set)\s")
_PROGRAM_WORDS = ("mysql", "mariadb", "sshpass", "mongo", "redis-cli", "sqlcmd", "bcp", "osql", "isql", "zip", "unzip",
                  "7z", "rar", "ldap", "ssh-keygen", "login", "smbclient", "rpcclient", "smbmap", "curl", "http", "xh",
                  "htpasswd", "xfreerdp", "openssl", "sqlplus", "set")
_PROGRAMS_AC = ahocorasick.Automaton()
for _w in _PROGRAM_WORDS:
    _PROGRAMS_AC.add_word(_w, len(_w))
_PROGRAMS_AC.make_automaton()


def _triggers(text: str):
    """Where an argv rule could apply, as (start, end): a secret-looking flag, or a program with
    secret flags (found by one Aho-Corasick pass, then checked where it is)."""
    for m in _FLAG_TRIGGER.finditer(text):
        yield m.start(), m.end()
    for end, n in _PROGRAMS_AC.iter(text):
        s = end + 1 - n
        if s and (text[s - 1].isalnum() or text[s - 1] in "_-"):
            continue
        m = _PROGRAM_AT.match(text, s)
        if m:
            yield s, m.end()


def shell_words(text: str) -> tuple[list[str | None], list[list[int]]]:
    """The words of a POSIX shell command line, quotes and escapes removed, with ``None`` between
    commands (``; | & && || ( )`` and newlines), and for each word the index in ``text`` of each of
    its characters."""
    words: list[str | None] = []
    spans: list[list[int]] = []
    cur: list[str] = []
    pos: list[int] = []
    in_word = False
    i, n = 0, len(text)

    def end_word():
        nonlocal cur, pos, in_word
        if in_word:
            words.append("".join(cur))
            spans.append(pos)
        cur, pos, in_word = [], [], False

    while i < n:
        c = text[i]
        if c == "'":
            j = text.find("'", i + 1)
            j = n if j < 0 else j
            cur.extend(text[i + 1:j])
            pos.extend(range(i + 1, j))
            in_word = True
            i = j + 1
        elif c == '"':
            i += 1
            in_word = True
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '"\\$`':
                    i += 1
                cur.append(text[i])
                pos.append(i)
                i += 1
            i += 1
        elif c == "\\" and i + 1 < n:
            if text[i + 1] != "\n":
                cur.append(text[i + 1])
                pos.append(i + 1)
                in_word = True
            i += 2
        elif c in " \t\r":
            end_word()
            i += 1
        elif c in ";|&()\n":
            end_word()
            if words and words[-1] is not None:
                words.append(None)
                spans.append([])
            i += 1
        elif c in "<>":
            end_word()
            i += 1
        else:
            cur.append(c)
            pos.append(i)
            in_word = True
            i += 1
    end_word()
    return words, spans


# -- decoded views ------------------------------------------------------------------------------
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_PCT_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_BS = re.compile(r"""\\(?:u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2}|["'\\/nrt])""")
# JSON / code escapes of quotes, slashes, unicode (JSON inside a string), or of a line continuation
# (an escaped backslash before an escaped newline: a command line continued inside a JSON string)
_BS_TRIGGER = re.compile(r"""\\["'/u]|\\\\\\n""")
_CONTINUATION = re.compile(r"\\\r?\n")  # a shell line continuation: backslash, newline
_B64_RUN = re.compile(r"(?<![A-Za-z0-9+/_=-])(?:[A-Za-z0-9+/]{16,}={0,2}|[A-Za-z0-9_-]{16,}={0,2})(?![A-Za-z0-9+/=_-])")
_MAX_BACKSLASH_LEVELS = 3
_MAX_PERCENT_LEVELS = 3
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Invisible characters: every format character (category Cf) of Unicode 15.1 and the other
# default-ignorable code points (a test checks this against the running Python's unicodedata).
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
_BS_MAP = {'"': '"', "'": "'", "\\": "\\", "/": "/", "n": "\n", "r": "\r", "t": "\t"}


class _View:
    """A decoded spelling of a text, and where each decoded position came from in the original."""

    def __init__(self, text: str, escapes: re.Pattern, decode: Callable[[str], str] | None = None,
                 edits: Iterable[tuple[int, int, str]] | None = None):
        """Each match of ``escapes`` decoded by ``decode``, or (``edits``) each ``(start, end,
        replacement)`` given, in order and not overlapping."""
        self.escapes = escapes
        if edits is None:
            assert decode is not None
            edits = ((m.start(), m.end(), decode(m.group(0))) for m in escapes.finditer(text))
        pieces, self._marks, last, dpos = [], [], 0, 0
        for start, end, d in edits:
            pieces.append(text[last:start])
            dpos += start - last
            self._marks.append((dpos, dpos + len(d), start, end))
            pieces.append(d)
            dpos += len(d)
            last = end
        pieces.append(text[last:])
        self.text = "".join(pieces)
        self._starts = [mk[0] for mk in self._marks]

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span of decoded ``[start, end)`` (an escape partly inside counts whole)."""
        return self._orig(start, True), self._orig(end - 1, False)

    def _orig(self, i: int, first: bool) -> int:
        k = bisect_right(self._starts, i) - 1
        if k < 0:
            return i if first else i + 1
        d0, d1, o0, o1 = self._marks[k]
        if i < d1:  # inside a decoded escape
            return o0 if first else o1
        return o1 + (i - d1) + (0 if first else 1)


def _percent_view(text: str) -> _View | None:
    if "%" not in text or not _PCT.search(text):
        return None
    return _View(text, _PCT_RUN, lambda run: bytes.fromhex(run.replace("%", "")).decode("utf-8", "replace"))


def _backslash_view(text: str) -> _View | None:
    if "\\" not in text or not _BS_TRIGGER.search(text):
        return None
    return _View(text, _BS, lambda esc: chr(int(esc[2:], 16)) if esc[1] in "ux" else _BS_MAP[esc[1]])


def _continuation_view(text: str) -> _View | None:
    """The text with shell line continuations (backslash-newline) removed: a secret continued on
    the next line reads whole."""
    if "\\\n" not in text and "\\\r\n" not in text:
        return None
    return _View(text, _CONTINUATION, lambda _: "")


_GLUED = re.compile(r"[\w+/=~.%-]")  # what can continue a secret right after a forged token


class _Chain:
    """A view of a view: its spans map back through both to the original text."""

    def __init__(self, outer, inner):
        self.outer, self.inner, self.text = outer, inner, inner.text

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self.outer.span(*self.inner.span(start, end))


def _unicode_view(text: str) -> _View | None:
    """The text without invisible characters (format characters, category Cf: zero-width space,
    word joiner, soft hyphen, bidi controls...; and the other default-ignorable ones: variation
    selectors, Hangul fillers) and with compatibility characters in their NFKC form (fullwidth
    letters, ligatures, a no-break space): ``ghp\u200b_…``, ``ＤＢ_ＰＡＳＳＷＯＲＤ=…`` read as what
    they show. Each character is mapped alone, so every position maps back to the original."""
    if text.isascii() or (_INVISIBLE.search(text) is None and unicodedata.is_normalized("NFKC", text)):
        return None
    edits = []
    for m in _NON_ASCII.finditer(text):
        c = m.group()
        d = "" if _INVISIBLE.match(c) or unicodedata.category(c) == "Cf" else unicodedata.normalize("NFKC", c)
        if d != c:
            edits.append((m.start(), m.end(), _INVISIBLE.sub("", d)))
    return _View(text, _NON_ASCII, edits=edits) if edits else None


def _layers(text: str, view: Callable[[str], _View | None], levels: int) -> list:
    """``view`` applied up to ``levels`` times (an encoding of an encoding), each layer mapped back
    to ``text``."""
    layers: list = []
    cur, t = None, text
    for _ in range(levels):
        v = view(t)
        if v is None or v.text == t:
            break
        cur = v if cur is None else _Chain(cur, v)
        layers.append(cur)
        t = v.text
    return layers


def _decoded_views(text: str) -> list:
    """Every decoded spelling of ``text`` that is scanned too: percent-decoded and backslash escapes
    decoded, each up to three levels deep (``%2526``, JSON in a JSON string in JSON output); each of
    those and the text itself with line continuations joined, and without invisible characters and
    in NFKC form."""
    pct = _layers(text, _percent_view, _MAX_PERCENT_LEVELS)
    layers = _layers(text, _backslash_view, _MAX_BACKSLASH_LEVELS)
    views: list = pct + layers
    for base in (None, *layers):
        cv = _continuation_view(text if base is None else base.text)
        if cv is not None:
            views.append(cv if base is None else _Chain(base, cv))
    for base in (None, *pct, *layers):
        uv = _unicode_view(text if base is None else base.text)
        if uv is not None:
            views.append(uv if base is None else _Chain(base, uv))
    return views


def _base64_text(run: str) -> str | None:
    """The text a base64 (or base64url) run encodes, if it is printable UTF-8 text, else None."""
    body = run.rstrip("=")
    if len(body) % 4 == 1:
        return None
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_" if ("-" in body or "_" in body) else None,
                               validate=True)
        dec = raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if len(dec) < _MIN_LEN or sum(c.isprintable() or c in "\n\r\t" for c in dec) < len(dec):
        return None
    return dec


def _shell_windows(text: str) -> list[tuple[int, int]]:
    """The parts of ``text`` the argv rules read: all of a short text with a trigger, else the lines
    (and the line after each, for a command continued with a backslash) where a trigger is, at most
    4 KB either side of it."""
    if len(text) <= 4096:
        return [(0, len(text))] if next(_triggers(text), None) is not None else []
    spans: list[tuple[int, int]] = []
    for ts, te in _triggers(text):  # (each search bounded: a long line with a trigger every few characters)
        a = max(text.rfind("\n", max(0, ts - 4096), ts) + 1, ts - 4096)
        b = text.find("\n", te, te + 4096)
        if b > 0 and text[b - 1:b] == "\\":
            b = text.find("\n", b + 1, te + 4096)
        b = min(len(text) if b < 0 else b, te + 4096)
        spans.append((a, b))
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# A private key's body without its BEGIN/END lines (an excerpt, a shell that ran the key file as a
# script: `sh: 3: MIIEvQIBADANBgkq…: not found`): a line that is one base64 run of PEM / OpenSSH line
# width and nothing else, or that run inside a shell's "not found" error. Hex (digests, git SHAs)
# and UUIDs are not base64 lines: upper and lower case letters are both required. A run that decodes
# to printable text is not key material (a key's body decodes to random bytes) but an encoded
# command or document: it stays, so obfuscated execution can be detected, and its text is scanned
# for secrets like any other layer.
_PEM_LINE = re.compile(
    r"^[ \t]*(?:(?:[\w./-]*sh|zsh|dash|ksh): (?:line )?(?:\d+: )?(?:command not found: )?)?"
    r"((?=[A-Za-z0-9+/]*[A-Z])(?=[A-Za-z0-9+/]*[a-z])[A-Za-z0-9+/]{40,100}={0,2})"
    r"(?:: (?:command )?not found|: No such file or directory)?[ \t]*\r?$", re.MULTILINE)
_PEM_LINE_TRIGGER = re.compile(r"[A-Za-z0-9+/]{40}")
_OPENSSH_KEY = "b3BlbnNzaC1rZXktdjE"  # base64 of "openssh-key-v1"


def _key_der(run: str) -> bool:
    """Whether a base64 run begins as a private key does: openssh-key-v1, or DER of a SEQUENCE
    whose first element is the INTEGER version 0 or 1 (PKCS#1, PKCS#8, SEC1; a certificate or a
    public key begins with a SEQUENCE inside the SEQUENCE instead)."""
    if len(run) < 40:
        return False
    if run.startswith(_OPENSSH_KEY):
        return True
    if not run.startswith("M"):
        return False
    try:
        head = base64.b64decode(run[:16], validate=True)
    except ValueError:
        return False
    if head[0] != 0x30:
        return False
    n = 1 + (head[1] & 0x7F) if head[1] & 0x80 else 1  # length octets after the tag
    i = 1 + n
    return head[i:i + 3] in (b"\x02\x01\x00", b"\x02\x01\x01")


def _pem_fragments(text: str) -> list["_Finding"]:
    """Private key material without its BEGIN/END lines: see ``_PEM_LINE`` and ``_key_der``."""
    found = []
    if _PEM_LINE_TRIGGER.search(text) is None:
        return found
    for m in _PEM_LINE.finditer(text):
        if _base64_text(m.group(1)) is not None:
            continue  # an encoded text (a payload piped to `base64 -d | sh`), not key bytes: the detector must see it
        found.append(_Finding(m.start(1), m.end(1), 0, -1, "private_key", m.group(1)))
    for m in _B64_RUN.finditer(text):
        if _key_der(m.group(0)):
            found.append(_Finding(m.start(), m.end(), 0, -1, "private_key", m.group(0)))
    return found


# A double-quoted string (escapes skipped) up to its closing quote, if any: on one line; over several
# (a double-quoted shell string, newlines and all). Read by `_quoted`, in one pass.
_QUOTED = re.compile(r'"((?:[^"\\\n]++|\\.)*+)("?)')
_QUOTED_LINES = re.compile(r'"((?:[^"\\]++|\\.)*+)("?)')


def _quoted(pattern: re.Pattern, text: str) -> Iterable[re.Match]:
    """The double-quoted strings of ``text`` with 3 characters or more inside, from left to right,
    as a regex search for ``"(…){3,}"`` would find them, in linear time: a string too short is
    passed over but its closing quote may open the next one; a quote never closed (a crafted
    ``\\"\\"\\"…`` line) ends the search where its string does (every quote up to there was
    escaped, so none opens a string that could close)."""
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        if not m.group(2):
            pos = m.end()
        elif m.end(1) - m.start(1) < 3:
            pos = m.end() - 1
        else:
            yield m
            pos = m.end()


def _argv_findings(text: str, lo: int, hi: int) -> list["_Finding"]:
    """What the argv rules find in the command lines of ``text[lo:hi]``."""
    found: list[_Finding] = []
    part = text[lo:hi]
    for a, b in _shell_windows(part):
        words, spans = shell_words(part[a:b])
        _words_findings(words, [[lo + a + p for p in pos] for pos in spans], found, 0)
    return found


def _words_findings(words: list[str | None], spans: list[list[int]], found: list["_Finding"], depth: int) -> None:
    """What the argv rules find in shell ``words`` whose characters sit at ``spans`` of the text; a
    word that is itself a command line (the argument of ``sh -c``, however it was quoted:
    ``bash -lc 'mysql -pX -e '"'"'select 1'"'"''`` as shlex.join writes it) is read as one too."""
    for wi, s, e, name in argv_secrets(words):
        pos = spans[wi]
        if e > s:
            found.append(_Finding(pos[s], pos[e - 1] + 1, _ARGV_RANK, -1, name, words[wi][s:e]))
    if depth >= 2:
        return
    for wi, w in enumerate(words):
        if w is not None and " " in w and next(_triggers(w), None) is not None:
            inner, ispans = shell_words(w)
            _words_findings(inner, [[spans[wi][p] for p in pos] for pos in ispans], found, depth + 1)


# -- the rule set -------------------------------------------------------------------------------
@dataclass
class _Finding:
    start: int
    end: int
    rank: int
    order: int
    name: str
    secret: str


class RuleSet:
    """Every rule (gitleaks' and ours), compiled lazily, behind one keyword automaton."""

    def __init__(self, rules: Iterable[Rule], global_allow: Allowlist | None = None):
        self.rules = list(rules)
        self.global_allow = global_allow
        self._automaton = ahocorasick.Automaton()
        by_kw: dict[str, set[int]] = {}
        self.always: list[int] = []
        for i, r in enumerate(self.rules):
            if not r.keywords:
                self.always.append(i)
            for k in r.keywords:
                by_kw.setdefault(k.lower(), set()).add(i)
        for k, idx in by_kw.items():
            self._automaton.add_word(k, frozenset(idx))
        self._automaton.make_automaton()

    def candidates(self, low: str) -> list[int]:
        """Indices (in rule order) of the rules whose keywords occur in the lower-cased text."""
        hit: set[int] = set(self.always)
        for _, idx in self._automaton.iter(low):
            hit |= idx
        return sorted(hit)

    def find(self, text: str, rule_ids: list[int]) -> list[_Finding]:
        out: list[_Finding] = []
        for order in rule_ids:
            r = self.rules[order]
            if r.requires and not any(c in text for c in r.requires):
                continue
            for m in r.finditer(text):
                groups = r.extra.get("value_groups") if r.extra else None
                if groups:
                    g = next((g for g in groups if m.start(g) >= 0), None)
                    if g is None:
                        continue
                    start, end = m.span(g)
                else:
                    start, end = r.secret_span(m)
                if end <= start:
                    continue
                secret = text[start:end]
                if r.source == "gitleaks":
                    if r.entropy and shannon_entropy(secret) <= r.entropy:
                        continue
                    mstart = r.match_start(text, m.start()) if r.left_context else m.start()
                    match, line = text[mstart:m.end()], _line(text, mstart, m.end())
                    if self.global_allow and self.global_allow.allows(secret, match, line):
                        continue
                    if any(a.allows(secret, match, line) for a in r.allowlists):
                        continue
                name, rank = r.name, r.rank
                if r.source != "gitleaks" and r.check is not None:
                    verdict = r.check(secret, m)
                    if not verdict:
                        continue
                    if isinstance(verdict, str):
                        name, rank = verdict, _RANK_OF.get(verdict, r.rank)
                if rank >= _GENERIC_RANK and _looks_like_digest(secret):
                    continue  # generic rules: a SHA, UUID or digest is not taken for a secret
                out.append(_Finding(start, end, rank, order, name, secret))
        return out


def _line(text: str, start: int, end: int) -> str:
    """The line of a match (what gitleaks' line allowlists read), at most 4 KB either side of it: a
    text of one long line with a match every few characters would otherwise be copied whole for each."""
    lo = max(0, start - _LINE_CONTEXT)
    a = text.rfind("\n", lo, start) + 1 or lo
    b = text.find("\n", end, end + _LINE_CONTEXT)
    return text[a:min(len(text), end + _LINE_CONTEXT)] if b < 0 else text[a:b]


_LINE_CONTEXT = 4096


_DEFAULT_RULES: RuleSet | None = None


def default_ruleset() -> RuleSet:
    """gitleaks' rules, then ours (rule order breaks ties), loaded once per process."""
    global _DEFAULT_RULES
    if _DEFAULT_RULES is None:
        gl, allow = load_gitleaks()
        _DEFAULT_RULES = RuleSet([*gl, *OWN_RULES], allow)
    return _DEFAULT_RULES


ARGV_DETECTORS = ("password_flag", "token_flag", "basic_auth")  # what `argv_secrets` reports


_MIN_LEN = 8
_ARGV_RANK = 2
_COARSE_RANK = 3  # gitleaks' curl-* rules
_GENERIC_RANK = 4


def load_redaction_key(home: Path, env: dict[str, str] | None = None) -> bytes:
    """The HMAC key: from the environment (text), a key file, or ``home/keys/redaction.key``
    (created once, 0600). A key file `schemas.keys.check_key_path` refuses (inside a git work tree,
    writable or readable by others, not yours) raises `UnsafeKeyError`: never use a key someone else
    could have planted -- they could then test guesses against every token. Falls back to an
    ephemeral key (tokens then only join within this process) if none can be stored."""
    env = os.environ if env is None else env
    if key := envvars.raw(REDACTION_KEY_ENV, env):
        return key.encode()
    if key_file := envvars.raw(REDACTION_KEY_FILE_ENV, env):
        path = Path(key_file)
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


_MAX_KNOWN = 4096  # secrets a remembering Redactor keeps (`Redactor.remember_found`)
_MAX_ISSUED = 1_000_000  # tokens a Redactor remembers issuing (`Redactor._issued`)


class Redactor:
    """Replaces secrets in events by keyed-HMAC tokens and records each replacement."""

    def __init__(self, key: bytes, rules: RuleSet | None = None):
        if not key:
            raise ValueError("the redaction key must not be empty")
        self._key = key
        self.notice: str | None = None  # what the hook says on stderr about the key (see hook_redaction_key)
        self._rules = rules
        self._tokens: dict[tuple[str, str], str] = {}
        # Every token this redactor issued: text already replaced by one of them is left alone (a
        # rescan, a redacted id redacted again); a token it did not issue is text like any other,
        # so a forged ``[SECRET:x:00000000]`` glued to a secret hides nothing.
        self._issued: set[str] = set()
        self._clean: set[str] = set()  # strings already scanned and found clean (paths, argv words repeat a lot)
        self._ids: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        self._envelope: dict[tuple, tuple[dict, list[dict]]] = {}
        self._keys: dict[str, str] = {}
        self._local = threading.local()  # .seen: the secrets replaced in the record being redacted
        self._known: dict[str, str] = {}  # secret -> token: replaced in every record (`add_known_secrets`)
        # The sandbox: a secret found in one record is a known secret for the records after it (a
        # command `echo x > $VALUE` creates a file named after it, with nothing around it that says secret).
        self.remember_found = False

    def add_known_secrets(self, secrets: Iterable[tuple[str, str]]) -> None:
        """(detector, value) pairs this producer knows to be secrets, whatever surrounds them: from
        now on every occurrence in a record's payload is replaced by the value's token (the sandbox:
        the secret-named variables of the command's environment, see `env_secrets`). Also their
        JSON-escaped and percent-encoded spellings."""
        for detector, value in secrets:
            if len(value) < _MIN_LEN or TOKEN_RE.fullmatch(value):
                continue
            tok = self.token(detector, value)
            for spelling in (value, json.dumps(value)[1:-1], quote(value, safe="")):
                if len(spelling) >= _MIN_LEN:
                    self._known.setdefault(spelling, tok)

    @cached_property
    def rules(self) -> RuleSet:
        return self._rules or default_ruleset()

    def token(self, detector: str, secret: str) -> str:
        cached = self._tokens.get((detector, secret))
        if cached is None:
            digest = hmac.new(self._key, secret.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:8]
            cached = f"[SECRET:{detector}:{digest}]"
            if len(self._tokens) < 100_000:
                self._tokens[(detector, secret)] = cached
            if len(self._issued) < _MAX_ISSUED:
                self._issued.add(cached)
        return cached

    # -- finding ------------------------------------------------------------------------------
    def _forged_view(self, text: str) -> _View | None:
        """``text`` without the tokens this redactor did not issue that are glued to what follows
        them: a forged ``[SECRET:x:00000000]`` in front of (or inside) a secret breaks every rule's
        pattern (``Bearer [SECRET:x:00000000]Zk9p…``, ``ghp_[SECRET:…]…``); without it the secret reads
        as usual and is replaced. (A token followed by a blank or a quote is a value of its own: a
        line redacted by another process keeps its tokens, ``PGPASSWORD=[SECRET:…] psql`` included.)"""
        issued = self._issued
        edits: list[tuple[int, int, str]] = []
        for m in reversed([m for m in TOKEN_RE.finditer(text) if m.group() not in issued]):
            if _GLUED.match(text, m.end()) or (edits and edits[-1][0] == m.end()):
                edits.append((m.start(), m.end(), ""))
        return _View(text, TOKEN_RE, edits=edits[::-1]) if edits else None

    def _findings(self, text: str, depth: int = 0) -> list[_Finding]:
        rules = self.rules
        cand = rules.candidates(text.lower())
        found = rules.find(text, cand) if cand else []
        views = _decoded_views(text)
        if TOKEN_PREFIX in text:
            fv = self._forged_view(text)
            if fv is not None:
                views.append(fv)
        for view in views:
            dcand = rules.candidates(view.text.lower())
            for f in rules.find(view.text, dcand) if dcand else ():
                f.start, f.end = view.span(f.start, f.end)
                found.append(f)  # f.secret stays the decoded secret: the token joins both spellings
            if " " in view.text and getattr(getattr(view, "inner", view), "escapes", None) in (_CONTINUATION, _NON_ASCII):
                # a command line continued on the next line, or with invisible characters in it
                # (``--pass\u00adword X``): the argv rules read it joined
                for f in _argv_findings(view.text, 0, len(view.text)):
                    f.start, f.end = view.span(f.start, f.end)
                    found.append(f)
        if depth < 2 and len(text) >= 16:
            # base64 of a credential line (`echo cGFzc3dvcmQ9… | base64 -d`, a Basic header, a k8s
            # Secret's data): a run that decodes to text holding a secret is replaced whole, and its
            # token is that of the decoded secret (so it joins the plain spelling)
            for m in _B64_RUN.finditer(text):
                dec = _base64_text(m.group(0))
                if dec is None:
                    continue
                inner = self._findings(dec, depth + 1)
                if inner:
                    best = min(inner, key=lambda f: (f.rank, f.start - f.end, f.start, f.order))
                    found.append(_Finding(m.start(), m.end(), best.rank, best.order, best.name, best.secret))
        if len(text) >= 40:
            found += _pem_fragments(text)
        if " " in text:
            found += _argv_findings(text, 0, len(text))
            if '"' in text:
                # a command line quoted inside a JSON string (a config dump, `ps` as JSON, a CI log) is
                # one shell word to the pass above: read each such string as a command line too, also
                # one JSON level down (the backslash view)
                for m in _quoted(_QUOTED, text):
                    if " " in m.group(1):
                        found += _argv_findings(text, m.start(1), m.end(1))
                if "\n" in text:
                    # a shell string over several lines is one word too: `sh -c "$(cat <<'EOF'⏎cf login
                    # -p X⏎EOF⏎)"`, `bash -c "cd /w⏎mysql -pX"` -- its lines are command lines
                    for m in _quoted(_QUOTED_LINES, text):
                        if "\n" in m.group(1) and " " in m.group(1):
                            found += _argv_findings(text, m.start(1), m.end(1))
                view = _backslash_view(text)
                for m in _quoted(_QUOTED, view.text) if view is not None else ():
                    if " " in m.group(1):
                        for f in _argv_findings(view.text, m.start(1), m.end(1)):
                            f.start, f.end = view.span(f.start, f.end)
                            found.append(f)
        return found

    def _apply(self, text: str, found: list[_Finding]) -> tuple[str, list[tuple[str, str]]]:
        """Replace what was found. Overlapping findings are merged (nothing any rule flagged stays
        readable) and named after the best of them (lowest rank, then longest); text already
        replaced by a token this redactor issued is left alone (a token it did not issue, forged or
        not, is text like any other; a finding that is a token whole hides nothing). Exception:
        gitleaks' curl rules, whose secret is ``user:password`` whole, give way to a finer rule that
        found the password in it."""
        live = [f for f in found if not (f.secret.startswith(TOKEN_PREFIX) and TOKEN_RE.fullmatch(f.secret))]
        if TOKEN_PREFIX in text:
            issued = self._issued
            tokens = [(t.start(), t.end(), t.group() in issued) for t in TOKEN_RE.finditer(text)]
            # nothing inside a token is a secret (``[SECRET:name:hex8]`` reads as name: value to the
            # assignment rules); what overlaps a token of ours was replaced already
            live = [f for f in live if not any(a < f.end and f.start < b and (ours or a <= f.start and f.end <= b)
                                               for a, b, ours in tokens)]
        if not live:
            return text, []
        fine = [(f.start, f.end) for f in live if f.rank < _COARSE_RANK]
        if fine:  # gitleaks' curl rules take user:password whole; a finer rule that found the password wins
            live = [f for f in live if f.rank != _COARSE_RANK or not any(a < f.end and f.start < b for a, b in fine)]
        live.sort(key=lambda f: (f.start, -f.end))
        clusters: list[list[_Finding]] = [[live[0]]]
        end = live[0].end
        for f in live[1:]:
            if f.start < end:
                clusters[-1].append(f)
                end = max(end, f.end)
            else:
                clusters.append([f])
                end = f.end
        pieces, out, last = [], [], 0
        for c in clusters:
            best = min(c, key=lambda f: (f.rank, f.start - f.end, f.start, f.order))
            start, stop = min(f.start for f in c), max(f.end for f in c)
            # the token is the best rule's secret, however wide the merged span: one secret, one token
            # in every event (``KEY=sk-…`` printed by env and ``body=env: KEY=sk-…`` in a request join)
            secret = best.secret
            if "%" in secret and _PCT.search(secret):
                secret = unquote(secret)  # p%40ss and p@ss are one secret: one token
            tok = self.token(best.name, secret)
            pieces += [text[last:start], tok]
            out.append((best.name, tok))
            seen = getattr(self._local, "seen", None)
            if seen is not None:
                seen[best.secret] = tok
                if secret != best.secret:
                    seen[secret] = tok
            last = stop
        pieces.append(text[last:])
        return "".join(pieces), out

    def scan(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """``text`` with every secret replaced, and the (detector, token) of each replacement."""
        if len(text) < _MIN_LEN or text in self._clean:
            return text, []
        findings = self._findings(text)
        new, found = self._apply(text, findings) if findings else (text, [])
        if not found and len(self._clean) < 50_000 and len(text) < 512:
            self._clean.add(text)
        return new, found

    def redact_id(self, value: str) -> str:
        """An id with any secret in it replaced; the same id gives the same result everywhere, and
        redacting a redacted id changes nothing (so every producer can apply it where ids enter and
        again where they are used)."""
        return self._redact_id(value)[0] if isinstance(value, str) else value

    def _redact_id(self, value: str) -> tuple[str, list[tuple[str, str]]]:
        hit = self._ids.get(value)
        if hit is not None:
            return hit
        res = self._fixed_point(value, self.scan)
        if len(self._ids) < 50_000:
            self._ids[value] = res
            # The redacted id maps to itself with what was found in the original: where the id was
            # redacted on entry (hook input, rollout line), the event still lists the replacement.
            self._ids[res[0]] = res
        return res

    def _fixed_point(self, value: str, scan) -> tuple[str, list[tuple[str, str]]]:
        cur, found = scan(value)
        for _ in range(3):
            again, more = scan(cur)
            if not more:
                break
            cur, found = again, found + more
        return cur, found

    def redact_key(self, value: str) -> str:
        """A state key built from ids and paths (a fact key such as ``cmd:<call_id>:started``) with
        any secret in it replaced. Like `redact_id`, but generic rules are not applied: they would
        take ``cmd:<random call id>`` for a high-entropy assignment, and a key must stay what it was
        for every id without a secret (keys stored before must still match)."""
        hit = self._keys.get(value)
        if hit is None:
            hit = self._fixed_point(value, self._scan_specific)[0]
            if len(self._keys) < 50_000:
                self._keys[value] = hit
                self._keys[hit] = hit
        return hit

    def _scan_specific(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        if len(text) < _MIN_LEN:
            return text, []
        findings = [f for f in self._findings(text) if f.rank < _GENERIC_RANK]
        return self._apply(text, findings) if findings else (text, [])

    def redact_ids_in(self, obj):
        """An agent record (hook input, rollout line, OTLP JSON) with every id in it redacted (keys
        in `ID_KEYS`, and OTel attributes ``{"key": K, "value": {"stringValue": V}}`` with K in it).
        Edits dicts in place; returns ``obj``."""
        if isinstance(obj, dict):
            k = obj.get("key")
            if isinstance(k, str) and k in ID_KEYS and isinstance(obj.get("value"), dict):
                v = obj["value"]
                for vk, vv in v.items():
                    if isinstance(vv, str):
                        v[vk] = self.redact_id(vv)
            for key, v in obj.items():
                if isinstance(v, str):
                    if key in ID_KEYS:
                        obj[key] = self.redact_id(v)
                elif isinstance(v, (dict, list)):
                    self.redact_ids_in(v)
        elif isinstance(obj, list):
            for item in obj:
                if isinstance(item, (dict, list)):
                    self.redact_ids_in(item)
        return obj

    def redact_argv(self, argv: list[str], path: str, out: list[dict]) -> list[str]:
        res = list(argv)
        words = [a if isinstance(a, str) else "" for a in argv]
        extra: dict[int, list[_Finding]] = {}
        for wi, s, e, name in argv_secrets(words) if next(_triggers(" ".join(words)), None) is not None else ():
            if e > s:
                extra.setdefault(wi, []).append(_Finding(s, e, _ARGV_RANK, -1, name, words[wi][s:e]))
        for i, a in enumerate(words):
            if i not in extra and (len(a) < _MIN_LEN or a in self._clean):
                continue
            found = self._findings(a) + extra.get(i, [])
            new, hits = self._apply(a, found)
            if hits:
                res[i] = new
                out.extend({"field": f"{path}[{i}]", "detector": d, "token": t} for d, t in hits)
            elif len(a) < 512 and len(self._clean) < 50_000 and i not in extra:
                self._clean.add(a)
        return res

    def walk(self, value, path: str, out: list[dict]):
        """``value`` (str, dict, list; nested) with every string redacted; replacements go to ``out``."""
        if isinstance(value, str):
            new, found = self.scan(value)
            if found:
                out.extend({"field": path, "detector": d, "token": t} for d, t in found)
                return new
            return value
        if isinstance(value, dict):
            changed = None
            clean = self._clean
            n0 = len(out)
            for k, v in value.items():
                if type(v) is str:  # the common case, inlined: most strings take the fast path here
                    if k in ID_FIELDS:
                        nv, found = self._redact_id(v)
                        if found:
                            out.extend({"field": f"{path}.{k}", "detector": d, "token": t} for d, t in found)
                    elif len(v) < _MIN_LEN or k in SKIP_FIELDS or v in clean:
                        continue
                    else:
                        nv = self.walk(v, f"{path}.{k}", out)
                elif v is None or k in SKIP_FIELDS or isinstance(v, (int, float, bool, bytes)):
                    continue
                elif k == "argv" and isinstance(v, list):
                    nv = self.redact_argv(v, f"{path}.{k}", out)
                else:
                    nv = self.walk(v, f"{path}.{k}", out)
                if nv is not v and nv != v:
                    if changed is None:
                        changed = dict(value)
                    changed[k] = nv
            if changed is not None and "shell" in changed and isinstance(value.get("argv"), list):
                self._argv_from_shell(value, changed, path, out, n0)
            return value if changed is None else changed
        if isinstance(value, list):
            res = None
            for i, item in enumerate(value):
                if type(item) is str and (len(item) < _MIN_LEN or item in self._clean):
                    continue
                nv = self.walk(item, f"{path}[{i}]", out)
                if nv is not item and nv != item:
                    if res is None:
                        res = list(value)
                    res[i] = nv
            return value if res is None else res
        return value

    def _argv_from_shell(self, value: dict, changed: dict, path: str, out: list[dict], n0: int) -> None:
        """A command whose argv is its shell string split into words (the hook's, from a shell string)
        whose shell string had a secret: its argv is split again from the redacted string. Split
        words lose the quotes and the context (a header name, a JSON key, the rest of a PEM block)
        that made the secret recognisable, so they are not redacted word by word."""
        shell = value.get("shell")
        if not isinstance(shell, str) or split_shell(shell) != value["argv"]:
            return
        argv = split_shell(changed["shell"])
        prefix = f"{path}.argv["
        out[n0:] = [r for r in out[n0:] if not r["field"].startswith(prefix)]
        for i, w in enumerate(argv):
            for tok in TOKEN_RE.findall(w):
                if tok not in self._issued:
                    continue  # text that looks like a token, not a replacement of ours
                out.append({"field": f"{path}.argv[{i}]", "detector": tok[len(TOKEN_PREFIX):].split(":")[0], "token": tok})
        changed["argv"] = self.redact_argv(argv, f"{path}.argv", out)

    def _propagate(self, value, path: str, subs: list[tuple[str, str]], out: list[dict]):
        """``value`` with every occurrence of each secret of ``subs`` replaced by its token (ids and
        digests are left alone: an id is redacted as an id, the same everywhere)."""
        if isinstance(value, str):
            new = value
            for secret, tok in subs:
                if secret in new:
                    new = new.replace(secret, tok)
                    out.append({"field": path, "detector": tok[len(TOKEN_PREFIX):].split(":")[0], "token": tok})
            return new
        if isinstance(value, dict):
            changed = None
            for k, v in value.items():
                if k in SKIP_FIELDS or k in ID_FIELDS or not isinstance(v, (str, list, dict)):
                    continue
                nv = self._propagate(v, f"{path}.{k}", subs, out)
                if nv is not v:
                    if changed is None:
                        changed = dict(value)
                    changed[k] = nv
            return value if changed is None else changed
        if isinstance(value, list):
            res = None
            for i, item in enumerate(value):
                nv = self._propagate(item, f"{path}[{i}]", subs, out)
                if nv is not item:
                    if res is None:
                        res = list(value)
                    res[i] = nv
            return value if res is None else res
        return value

    def __call__(self, record: dict) -> dict:
        """The transform the Recorder applies before encoding (returns the same dict, edited): the
        payload, and every string of the envelope an agent or host supplies."""
        out: list[dict] = []
        ids = self._ids
        for key in ("turn_id", "tool_call_id"):
            v = record.get(key)
            if v.__class__ is str:
                nv, found = ids.get(v) or self._redact_id(v)
                if found:
                    record[key] = nv
                    out.extend({"field": key, "detector": d, "token": t} for d, t in found)
        for key in ("producer", "trace"):
            v = record.get(key)
            if isinstance(v, dict):
                # one process records under one producer identity: remember its (redacted) form
                memo_key = (key, *v.values())
                hit = self._envelope.get(memo_key)
                if hit is None:
                    found: list[dict] = []
                    hit = (self.walk(v, key, found), found)
                    if len(self._envelope) < 1000:
                        self._envelope[memo_key] = hit
                nv, found = hit
                if found:
                    record[key] = dict(nv)
                    out.extend(found)
        name, payload = record["payload"]
        self._local.seen = seen = {}
        try:
            new = self.walk(payload, "payload", out)
        finally:
            self._local.seen = None
        # A secret found in one field is replaced wherever else it occurs in the event: the argv the
        # hook splits from a shell string keeps the secret without the quotes or the context (a
        # header name, a JSON key) that made it recognisable in the shell string.
        found = {k: v for k, v in seen.items() if len(k) >= _MIN_LEN and not TOKEN_RE.fullmatch(k)}
        subs = sorted({**self._known, **found}.items(), key=lambda kv: -len(kv[0]))
        if self.remember_found and found and len(self._known) < _MAX_KNOWN:
            for secret, tok in found.items():
                for spelling in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
                    if len(spelling) >= _MIN_LEN:
                        self._known.setdefault(spelling, tok)
        if subs:
            new = self._propagate(new, "payload", subs, out)
        if new is not payload:
            record["payload"] = (name, new)
        if out:
            record["redactions"] = list(record.get("redactions") or []) + out
        return record


def redactor_of(transforms: Iterable[Callable]) -> Redactor | None:
    """The `Redactor` among a producer's transforms (None when redaction is off)."""
    return next((t for t in transforms if isinstance(t, Redactor)), None)


def id_redaction(transforms: Iterable[Callable], keys: bool = False) -> Callable[[str], str]:
    """`Redactor.redact_id` (``keys``: `Redactor.redact_key`) of the producer's redactor, or the
    identity when redaction is off."""
    red = redactor_of(transforms)
    if red is None:
        return lambda s: s
    return red.redact_key if keys else red.redact_id


def default_transforms(settings: Settings, env: Mapping[str, str] | None = None, *,
                       key_fallback: bool = False) -> list[Callable[[dict], dict]]:
    """Transforms every producer applies (recorder, hooks, importers, sandbox): redaction, on by default.
    AGENTLEDGER_REDACTION=off turns it off (never do that outside tests of raw data). A refused key
    file raises `UnsafeKeyError`; with ``key_fallback`` (the hook) the key of `hook_redaction_key` is
    used instead, and the Redactor's ``notice`` says so."""
    env = os.environ if env is None else env
    if not envvars.get(REDACTION_SWITCH_ENV, env):
        log.warning("secret redaction is OFF (%s=off)", REDACTION_SWITCH_ENV)
        return []
    if key_fallback:
        key, notice = hook_redaction_key(settings.home, env)
        red = Redactor(key)
        red.notice = notice
        return [red]
    return [Redactor(load_redaction_key(settings.home, env))]

"""The policy model: sandbox mode and writable roots, network rules, approval rules.

One engine shared by every stage that decides or re-decides: hooks answering agents, the recording
sandbox and its egress proxy, and replay's "what would this policy have done". A policy is a TOML
file (see docs/policy.md)::

    name = "team-default"

    [sandbox]
    mode = "workspace_write"            # read_only | workspace_write | danger_full_access
    writable_roots = ["$WORKSPACE", "/tmp"]
    deny_read = ["~/.ssh/**", "~/.aws/**"]

    [sandbox.env]
    allow = ["PATH", "HOME", "LANG", "TERM", "CI"]
    deny = ["*TOKEN*", "*SECRET*", "*PASSWORD*", "AWS_*"]

    [network]
    default = "deny"                    # allow | deny | ask, when no rule matches
    [[network.rules]]
    id = "registries"
    action = "allow"
    hosts = ["pypi.org", "*.pythonhosted.org", "registry.npmjs.org"]
    ports = [443]
    [[network.rules]]
    id = "no-raw-ip"
    action = "deny"
    raw_ip = true

    [approvals]
    default = "prompt"                  # allow | prompt | forbidden, for commands no rule matches
    escalation = "prompt"               # requests to run outside the sandbox
    noninteractive = "deny"             # what an unanswered prompt becomes
    timeout_s = 60
    [[approvals.rules]]
    id = "read-only-git"
    decision = "allow"
    prefix = ["git", ["status", "diff", "log"]]

Semantics, chosen to fail safe: when several rules match, the most restrictive wins (network:
deny > ask > allow; commands: forbidden > prompt > allow), as in Codex's execpolicy. A command
prefix element is a string or a list of alternatives. Host patterns are case-insensitive globs
(``*.example.com`` matches any subdomain, not the apex); address rules (``cidrs``, and ``hosts``
entries that are addresses) match an address literal in any spelling, or the addresses a name was
resolved to (`Policy.evaluate_network`); `schemas.netaddr` is the one reading of a host.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import ipaddress
import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from .errors import ConfigError
from .netaddr import Host, HostError, IPAddress, aliases, canonical_network, idna_ascii, parse_address, parse_host

NETWORK_ACTIONS = ("allow", "ask", "deny")  # ascending restrictiveness
COMMAND_DECISIONS = ("allow", "prompt", "forbidden")
SANDBOX_MODES = ("read_only", "workspace_write", "danger_full_access")
POLICY_SECTIONS = frozenset({"sandbox", "network", "approvals"})


@dataclass(frozen=True)
class Decision:
    action: str  # network: allow|ask|deny ; command: allow|prompt|forbidden ; file: allow|deny
    rule: str | None  # id of the deciding rule; None when the default applied
    reason: str
    subject: str | None = None  # commands: the simple command (or "network to host:port") that decided

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


def _ports(spec: Any) -> list[tuple[int, int]]:
    out = []
    for p in spec or []:
        if isinstance(p, int):
            out.append((p, p))
        elif isinstance(p, str) and "-" in p:
            lo, hi = p.split("-", 1)
            out.append((int(lo), int(hi)))
        else:
            out.append((int(p), int(p)))
    return out


def is_ip(host: str) -> bool:
    """Whether ``host`` is an address literal, in any of the forms `schemas.netaddr` reads."""
    try:
        return parse_host(host).is_address
    except HostError:
        return False


@dataclass(frozen=True)
class NetworkRule:
    id: str
    action: str
    hosts: tuple[str, ...] = ()  # as written (name globs and address literals)
    cidrs: tuple[Any, ...] = ()  # every address range the rule names: its cidrs and its address hosts
    ports: tuple[tuple[int, int], ...] = ()
    protocols: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    raw_ip: bool | None = None
    names: tuple[str, ...] = ()  # the name globs among hosts, canonical

    def matches(self, dest: Host, address: IPAddress | None, port: int | None, protocol: str | None,
                method: str | None) -> bool:
        """``dest``: the host as requested; ``address``: the address it is decided at (the literal
        itself, or one address a name resolved to; None when a name is decided on its own)."""
        if self.raw_ip is not None and dest.is_address != self.raw_ip:
            return False
        if self.hosts or self.cidrs:
            targets = aliases(address) if address is not None else ()
            name_ok = any(_host_match(pat, dest.text) for pat in self.names) or (
                dest.is_address and any(_host_match(pat, str(a)) for pat in self.names for a in targets))
            addr_ok = any(a in net for a in targets for net in self.cidrs if a.version == net.version)
            if not (name_ok or addr_ok):
                return False
        if self.ports and (port is None or not any(lo <= port <= hi for lo, hi in self.ports)):
            return False
        if self.protocols and (protocol or "").lower() not in self.protocols:
            return False
        if self.methods and (method or "").upper() not in self.methods:
            return False
        return True


def _host_match(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and fnmatch.fnmatchcase(host, pattern)
    return fnmatch.fnmatchcase(host, pattern)


def _network_rule(r: dict[str, Any], rid: str, where: str) -> NetworkRule:
    """One ``[[network.rules]]`` entry: host entries that are address literals (in any form) become
    address ranges, the others name globs (canonical: lower case, IDNA, no trailing dot)."""
    try:
        cidrs = [canonical_network(ipaddress.ip_network(c, strict=False)) for c in r.get("cidrs", [])]
    except ValueError as exc:
        raise ConfigError(f"{where}: rule {rid}: {exc}") from exc
    names = []
    for h in r.get("hosts", []):
        if not isinstance(h, str) or not h.strip():
            raise ConfigError(f"{where}: rule {rid}: a host must be a non-empty string, not {h!r}")
        if not any(c in h for c in "*?["):
            try:
                host = parse_host(h)
            except HostError as exc:
                raise ConfigError(f"{where}: rule {rid}: {exc}") from exc
            if host.address is not None:
                cidrs.append(ipaddress.ip_network(host.address))
            else:
                names.append(host.text)
            continue
        names.append(_glob(h))
    return NetworkRule(
        id=rid,
        action=_check(r.get("action"), NETWORK_ACTIONS, f"{where}: rule {rid} action"),
        hosts=tuple(h.lower() for h in r.get("hosts", [])),
        cidrs=tuple(cidrs),
        ports=tuple(_ports(r.get("ports"))),
        protocols=tuple(x.lower() for x in r.get("protocols", [])),
        methods=tuple(x.upper() for x in r.get("methods", [])),
        raw_ip=r.get("raw_ip"),
        names=tuple(names),
    )


def _glob(pattern: str) -> str:
    """A host glob in the canonical form of names (lower case, IDNA labels, no trailing dot)."""
    pattern = pattern.strip().lower().rstrip(".")
    try:
        return ".".join(label if label.isascii() else idna_ascii(label) for label in pattern.split("."))
    except HostError as exc:
        raise ConfigError(f"host pattern {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class CommandRule:
    id: str
    decision: str
    prefix: tuple[tuple[str, ...], ...]  # each position: alternatives
    justification: str | None = None

    def matches(self, argv: list[str]) -> bool:
        if len(argv) < len(self.prefix):
            return False
        for alts, arg in zip(self.prefix, argv):
            if not any(fnmatch.fnmatchcase(arg, a) for a in alts):
                return False
        return True


@dataclass
class Policy:
    name: str = "unnamed"
    sandbox_mode: str = "workspace_write"
    writable_roots: list[str] = field(default_factory=lambda: ["$WORKSPACE"])
    deny_read: list[str] = field(default_factory=list)
    env_allow: list[str] = field(default_factory=list)
    env_deny: list[str] = field(default_factory=list)
    network_default: str = "deny"
    network_rules: list[NetworkRule] = field(default_factory=list)
    command_default: str = "prompt"
    escalation: str = "prompt"
    noninteractive: str = "deny"
    approval_timeout_s: float = 60.0
    command_rules: list[CommandRule] = field(default_factory=list)
    source: str | None = None  # the file it came from
    digest: str | None = None  # sha256 of the file bytes
    # the sections the file states ([sandbox], [network], [approvals]); what-if re-decides only the
    # requests of those (a network-only policy asks a network-only question)
    sections: frozenset[str] = POLICY_SECTIONS

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read policy {path}: {exc}") from exc
        p = cls.from_toml(data.decode(), source=str(path))
        return p

    @classmethod
    def from_toml(cls, text: str, source: str | None = None) -> "Policy":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"policy {source or ''}: invalid TOML: {exc}") from exc
        p = cls.from_dict(data, source=source)
        p.digest = hashlib.sha256(text.encode()).hexdigest()
        return p

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "Policy":
        where = f"policy {source}" if source else "policy"
        known = ("name", "description", *sorted(POLICY_SECTIONS))
        unknown = sorted(set(data) - set(known))
        if unknown:
            guesses = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1, 0.6)) else k
                       for k in unknown]
            raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(guesses)}; "
                              "a policy has name, description, [sandbox], [network], [approvals]")
        sb = data.get("sandbox", {})
        net = data.get("network", {})
        ap = data.get("approvals", {})
        env = sb.get("env", {})
        mode = sb.get("mode", "workspace_write")
        _check(mode, SANDBOX_MODES, f"{where}: sandbox.mode")
        p = cls(
            name=data.get("name", "unnamed"),
            sandbox_mode=mode,
            writable_roots=list(sb.get("writable_roots", ["$WORKSPACE"])),
            deny_read=list(sb.get("deny_read", [])),
            env_allow=list(env.get("allow", [])),
            env_deny=list(env.get("deny", [])),
            network_default=_check(net.get("default", "deny"), NETWORK_ACTIONS, f"{where}: network.default"),
            command_default=_check(ap.get("default", "prompt"), COMMAND_DECISIONS, f"{where}: approvals.default"),
            escalation=_check(ap.get("escalation", "prompt"), COMMAND_DECISIONS, f"{where}: approvals.escalation"),
            noninteractive=_check(ap.get("noninteractive", "deny"), ("allow", "deny"), f"{where}: approvals.noninteractive"),
            approval_timeout_s=float(ap.get("timeout_s", 60)),
            source=source,
            sections=frozenset(k for k in POLICY_SECTIONS if k in data),
        )
        for i, r in enumerate(net.get("rules", [])):
            p.network_rules.append(_network_rule(r, r.get("id", f"network.rules[{i}]"), where))
        for i, r in enumerate(ap.get("rules", [])):
            rid = r.get("id", f"approvals.rules[{i}]")
            prefix = r.get("prefix")
            if not prefix or not isinstance(prefix, list):
                raise ConfigError(f"{where}: rule {rid} needs a non-empty prefix list")
            p.command_rules.append(CommandRule(
                id=rid,
                decision=_check(r.get("decision"), COMMAND_DECISIONS, f"{where}: rule {rid} decision"),
                prefix=tuple(tuple(x) if isinstance(x, list) else (x,) for x in prefix),
                justification=r.get("justification"),
            ))
        return p

    # -- network --------------------------------------------------------------------------
    def evaluate_network(self, host: str, port: int | None = None, protocol: str | None = None,
                         method: str | None = None, addresses: Iterable[str] | None = None) -> Decision:
        """The decision on a connection to ``host`` (any spelling: see `schemas.netaddr`).

        Name rules (``hosts`` globs) match the name; address rules (``cidrs``, address ``hosts``)
        match an address literal, or the ``addresses`` a name resolved to -- every one of them is
        decided and the most restrictive decision wins (the egress proxy resolves once, decides on
        all of them and connects only to them). A host name without ``addresses`` is decided on
        the name alone. A host that is no host (`HostError`) is denied."""
        try:
            dest = parse_host(host)
            if dest.address is not None:
                at = [dest.address]
            else:
                at = list(dict.fromkeys(parse_address(a) for a in (addresses or ())))
        except HostError as exc:
            return Decision("deny", "network.invalid_host", f"{host!r}:{port} is not a valid destination: {exc}")
        if not at:
            return self._decide_network(dest, None, port, protocol, method)
        decisions = [self._decide_network(dest, a, port, protocol, method) for a in at]
        return max(decisions, key=lambda d: NETWORK_ACTIONS.index(d.action))  # (the first of the worst)

    def _decide_network(self, dest: Host, address: IPAddress | None, port: int | None, protocol: str | None,
                        method: str | None) -> Decision:
        name = f"[{dest.text}]" if ":" in dest.text else dest.text
        where = f"{name}:{port}" + (f" (resolved to {address})" if address is not None and not dest.is_address else "")
        matched = [r for r in self.network_rules if r.matches(dest, address, port, protocol, method)]
        if not matched:
            return Decision(self.network_default, None, f"no rule matches {where}; default {self.network_default}")
        worst = max(matched, key=lambda r: NETWORK_ACTIONS.index(r.action))
        return Decision(worst.action, worst.id, f"{where} matched rule {worst.id} ({worst.action})")

    def resolves_names(self) -> bool:
        """Whether a host name's addresses can lift a deny decided on the name alone: the policy has
        an address rule that allows or asks. (Address rules that deny cannot, so a name the policy
        denies anyway is never handed to a resolver: a lookup alone can carry data out over DNS.)"""
        return any(r.cidrs and r.action != "deny" for r in self.network_rules)

    # -- commands -------------------------------------------------------------------------
    def evaluate_command(self, argv: list[str], *, escalated: bool = False) -> Decision:
        """allow: run without asking; prompt: ask a human; forbidden: refuse.

        A shell wrapper (``bash -lc "a && b | c"``) is decided by every simple command it runs (each
        by its rules, or the default) and by any rule written for the wrapper itself: the most
        restrictive decision wins, and its ``subject`` names the command that decided."""
        argv = [str(a) for a in argv]
        segments = simple_commands(argv)
        decisions = [self._evaluate_simple(seg, escalated) for seg in segments]
        if segments != [argv]:  # a real wrapper: rules written for it count too
            whole = [r for r in self.command_rules if r.matches(argv)]
            if whole:
                worst = max(whole, key=lambda r: COMMAND_DECISIONS.index(r.decision))
                decisions.append(Decision(worst.decision, worst.id, f"matched rule {worst.id} ({worst.decision})",
                                          " ".join(argv)[:200]))
        return max(decisions, key=lambda d: COMMAND_DECISIONS.index(d.action))  # (the first of the worst)

    def evaluate_shell_call(self, argv: list[str], shell: str | None = None, *, escalated: bool = False) -> Decision:
        """The decision on an agent's shell tool call, as `agentledger hook` enforces it: every simple
        command of ``shell`` (the command string, when the agent gave one) or of ``argv`` is decided
        (`evaluate_command`), and a URL in the command line to a destination the network rules deny
        makes the call forbidden too."""
        argv = [str(a) for a in argv]
        if shell and simple_commands(argv) == [argv]:  # a command string (its argv is only its tokens)
            d = self.evaluate_shell_string(shell, escalated=escalated)
        else:
            d = self.evaluate_command(argv, escalated=escalated)
        if d.action == "forbidden":
            return d
        for scheme, host, port in urls_in(shell or " ".join(str(a) for a in argv)):
            n = self.evaluate_network(host, port, network_protocol(scheme, port))
            if n.action == "deny":
                return Decision("forbidden", n.rule, n.reason, f"network to {host}:{port}")
        return d

    def evaluate_shell_string(self, command: str, *, escalated: bool = False) -> Decision:
        """A command given as a shell string: decided by every simple command in it (there is no
        wrapper argv for rules to match)."""
        decisions = [self._evaluate_simple(seg, escalated) for seg in shell_segments(command)]
        return max(decisions, key=lambda d: COMMAND_DECISIONS.index(d.action))

    def _evaluate_simple(self, argv: list[str], escalated: bool) -> Decision:
        matched = [r for r in self.command_rules if r.matches(argv)]
        subject = " ".join(argv)[:200]
        candidates = []
        if matched:
            worst = max(matched, key=lambda r: COMMAND_DECISIONS.index(r.decision))
            candidates.append(Decision(worst.decision, worst.id, f"matched rule {worst.id} ({worst.decision})", subject))
        else:
            candidates.append(Decision(self.command_default, None, f"no rule matches; default {self.command_default}",
                                       subject))
        for inner in wrapped_suffixes(argv):  # what a wrapper runs answers to the rules written for it
            ruled = [r for r in self.command_rules if r.matches(inner)]
            if ruled:
                worst = max(ruled, key=lambda r: COMMAND_DECISIONS.index(r.decision))
                candidates.append(Decision(worst.decision, worst.id, f"matched rule {worst.id} ({worst.decision})",
                                           " ".join(inner)[:200]))
        if escalated:
            candidates.append(Decision(self.escalation, "escalation", f"runs outside the sandbox; escalation {self.escalation}",
                                       subject))
        return max(candidates, key=lambda d: COMMAND_DECISIONS.index(d.action))

    # -- files ----------------------------------------------------------------------------
    # `~` in a policy is the home directory of the user the session runs (or ran) as: ``home=None``
    # is this process's user's (the live hook and the sandbox run as the session's user), a string
    # is a recorded session's home (what-if), `ANY_HOME` a session whose home is not known.
    def roots(self, workspace: str | None, home: "str | _AnyHome | None" = None) -> list[str]:
        out = []
        for r in self.writable_roots:
            if "$WORKSPACE" in r:
                if not workspace:
                    continue
                r = r.replace("$WORKSPACE", workspace)
            if home is ANY_HOME and _tilde(r):
                continue  # an unknown home grants no writes
            out.append(os.path.normpath(expand_home(r, home)[0]))
        return out

    def evaluate_write(self, path: str, workspace: str | None = None,
                       home: "str | _AnyHome | None" = None, resolve: Callable[[str], str] | None = None) -> Decision:
        """``resolve``: how the roots are read when ``path`` is where links lead (``os.path.realpath``
        on the machine the path is on), so a root reached through a link still holds it."""
        if self.sandbox_mode == "danger_full_access":
            return Decision("allow", "sandbox.mode", "danger_full_access allows every write")
        if self.sandbox_mode == "read_only":
            return Decision("deny", "sandbox.mode", "read_only sandbox: no writes")
        p = os.path.normpath(_expand_path(path, home))
        roots = self.roots(workspace, home)
        for root in [*roots, *(resolve(r) for r in roots)] if resolve else roots:
            if p == root or p.startswith(root.rstrip("/") + "/"):
                return Decision("allow", "sandbox.writable_roots", f"inside writable root {root}")
        return Decision("deny", "sandbox.writable_roots", f"{path} is outside the writable roots")

    def evaluate_read(self, path: str, home: "str | _AnyHome | None" = None) -> Decision:
        p = os.path.normpath(_expand_path(path, home))
        for pat in self.deny_read:
            for pat_x in expand_home(pat, home):
                if fnmatch.fnmatchcase(p, pat_x) or PurePosixPath(p).match(pat_x):
                    return Decision("deny", "sandbox.deny_read", f"{path} matches deny_read {pat}"
                                    + (" (home unknown: any home directory)" if home is ANY_HOME and _tilde(pat)
                                       else ""))
        return Decision("allow", None, "readable")

    def uses_home(self) -> bool:
        """Whether `~` appears in the policy's paths (so what the home is matters)."""
        return any(_tilde(x) for x in (*self.deny_read, *self.writable_roots))

    # -- environment ----------------------------------------------------------------------
    def env_allowed(self, name: str) -> bool:
        """Deny patterns win; with an allow list, only listed names pass."""
        if any(fnmatch.fnmatchcase(name.upper(), pat.upper()) for pat in self.env_deny):
            return False
        if self.env_allow:
            return any(fnmatch.fnmatchcase(name, pat) for pat in self.env_allow)
        return True

    def filter_env(self, env: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in env.items() if self.env_allowed(k)}

    # -- as recorded in session_started ---------------------------------------------------
    def network_summary(self) -> dict[str, Any]:
        allowed = sorted({h for r in self.network_rules if r.action == "allow" for h in r.hosts})
        denied = sorted({h for r in self.network_rules if r.action == "deny" for h in r.hosts})
        if self.network_default == "allow":
            mode = "enabled"  # open by default (denied_domains lists what is still refused)
        elif not allowed and not any(r.action != "deny" for r in self.network_rules):
            mode = "disabled"
        else:
            mode = "allowlist"
        return {"mode": mode, "allowed_domains": allowed, "denied_domains": denied}


# --- `~`: whose home ---------------------------------------------------------------------------------

HOME_DIRS = ("/home/*", "/Users/*", "/var/home/*", "/root")  # where user homes live (Linux, macOS)


class _AnyHome:
    """The home of a session that did not record it: any home directory (`HOME_DIRS`)."""

    def __repr__(self) -> str:
        return "ANY_HOME"


ANY_HOME = _AnyHome()


def _tilde(path: str) -> bool:
    return path == "~" or path.startswith("~/")


def expand_home(path: str, home: "str | _AnyHome | None" = None) -> list[str]:
    """``path`` (a policy pattern or root) with a leading ``~`` expanded: to this process's user's
    home when ``home`` is None, to ``home`` when given, and with `ANY_HOME` to every home directory
    pattern (plus ``~`` itself, which matches paths recorded unexpanded). ``~name`` is expanded only
    for this process (it names a user of this machine)."""
    if not _tilde(path):
        return [os.path.expanduser(path) if home is None and path.startswith("~") else path]
    if home is None:
        return [os.path.expanduser(path)]
    if home is ANY_HOME:
        return [h + path[1:] for h in HOME_DIRS] + [path]
    return [str(home).rstrip("/") + path[1:]]


def _expand_path(path: str, home: "str | _AnyHome | None") -> str:
    """A path a session accessed: ``~`` is its home (left as ``~`` when its home is unknown)."""
    return path if home is ANY_HOME else expand_home(path, home)[0]


def _check(value: Any, allowed: Iterable[str], what: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


# --- how commands and URLs are read (shared by the producers and replay) ---------------------

SHELLS = {"bash", "sh", "zsh", "dash", "fish", "ksh", "pwsh", "powershell", "powershell.exe", "cmd.exe"}
# words that run the rest of their line as a command (``sudo -u root rm ...``, ``timeout 5 rm ...``)
WRAPPERS = {"command", "builtin", "exec", "nohup", "env", "sudo", "doas", "nice", "ionice", "timeout", "stdbuf",
            "xargs", "time", "setsid", "unbuffer", "watch", "chronic", "flock", "caffeinate", "busybox", "eval"}
# shell words that precede a command without being one (``if``, ``then``, ``do``, ``{``, ``!``...)
_LEADING = {"{", "}", "!", "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "time", "esac", "(", ")"}
# words that start a clause whose words are not a command (``for x in a b``, ``case $x in``)
_CLAUSES = {"for", "select", "case", "function"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
_OPERATORS = ";&|()\n"


def wrapped_command(argv: list[str]) -> str | None:
    """The command string of a shell wrapper argv (``bash -lc "..."``, ``bash -l -c "..."``,
    ``sh -ec "..."``, ``bash --login -c "..."``), else None."""
    if len(argv) < 3 or os.path.basename(argv[0]) not in SHELLS:
        return None
    i, has_c = 1, False
    while i < len(argv) and argv[i][:1] in ("-", "+") and argv[i] not in ("-", "--"):
        opt = argv[i]
        if not opt.startswith("--") and "c" in opt[1:]:
            has_c = True
        i += 2 if opt in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file") else 1
    if i < len(argv) and argv[i] == "--":
        i += 1
    return argv[i] if has_c and i < len(argv) else None


def simple_commands(argv: list[str]) -> list[list[str]]:
    """The simple commands inside an argv: unwraps ``bash -lc "a && b | c"`` and splits the string on
    shell operators, so a policy sees every program a compound command runs."""
    inner = wrapped_command(argv)
    return shell_segments(inner) if inner is not None else [argv]


def _substitutions(command: str) -> list[str]:
    """The command strings of the backquote and ``$( )`` substitutions in ``command`` (not inside
    single quotes, where the shell runs nothing)."""
    out, i, quote = [], 0, None
    while i < len(command):
        c = command[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "'" and quote is None:
            quote = "'"
        elif c == '"':
            quote = None if quote == '"' else '"'
        elif c == "`":
            j = command.find("`", i + 1)
            j = len(command) if j < 0 else j
            out.append(command[i + 1:j])
            i = j
        elif command.startswith("$(", i) and not command.startswith("$((", i):
            depth, j = 1, i + 2
            while j < len(command) and depth:
                depth += {"(": 1, ")": -1}.get(command[j], 0)
                j += 1
            out.append(command[i + 2:j - 1 if depth == 0 else j])
            i = j - 1
        i += 1
    return out


def shell_segments(command: str) -> list[list[str]]:
    """The simple commands of a shell string: split on ``; & | ( )`` and newlines, without the words
    that only lead a command (``if``, ``then``, ``do``, ``{``, ``!``, ``VAR=value``), with every
    backquote and ``$( )`` substitution's commands, and shell wrappers unwrapped. A comment's words
    are left out; a ``for``/``case`` clause's words are no command."""
    try:
        lex = shlex.shlex(command, posix=True, punctuation_chars=_OPERATORS)
        lex.whitespace_split = True
        lex.whitespace = " \t\r"
        lex.commenters = ""  # a comment ends at its newline, which must still separate commands
        tokens = list(lex)
    except ValueError:
        tokens = command.split()
    out: list[list[str]] = []
    cur: list[str] = []
    for t in [*tokens, ";"]:
        if t and set(t) <= set(_OPERATORS):
            comment = next((i for i, w in enumerate(cur) if w.startswith("#")), None)
            cur = cur[:comment]
            while cur and (cur[0] in _LEADING or _ASSIGNMENT.match(cur[0])):
                cur = cur[1:]
            if cur and cur[0] not in _CLAUSES:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    for inner in _substitutions(command):
        out.extend(shell_segments(inner))
    result: list[list[str]] = []
    for seg in out:
        result.extend(simple_commands(seg) if len(seg) >= 3 else [seg])
    return result or [[command]]


def wrapped_suffixes(argv: list[str]) -> list[list[str]]:
    """What a wrapper (``sudo``, ``env``, ``timeout``, `WRAPPERS`) may run: every suffix of its argv
    that starts at a word that is not an option, an assignment or a number. A policy matches its rules
    on each (the rule for ``rm`` holds under ``sudo -u root rm``); which suffix the wrapper really runs
    depends on its options, so none of them counts as a command of its own when no rule matches it."""
    if not argv or os.path.basename(argv[0]) not in WRAPPERS:
        return []
    out = []
    for i in range(1, len(argv)):
        w = argv[i]
        if w[:1] in ("-", "+") or _ASSIGNMENT.match(w) or w.replace(".", "").isdigit():
            continue
        inner = argv[i:]
        out.append(inner)
        out.extend(s for s in wrapped_suffixes(inner) if s not in out)
        nested = wrapped_command(inner)
        if nested is not None:
            out.extend(s for s in shell_segments(nested) if s not in out)
    if os.path.basename(argv[0]) == "eval" and len(argv) > 1:
        out.extend(shell_segments(" ".join(argv[1:])))
    return out


_URL = re.compile(r"\b(https?|ftp|ssh|git|wss?)://([^\s/?#'\"<>`]*)", re.IGNORECASE)
_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80, "ftp": 21, "ssh": 22, "git": 9418}
_SHELL_SYNTAX = set("$`{}()*<>|;&")


def urls_in(text: str) -> list[tuple[str, str, int]]:
    """(scheme, host, port) of every URL in a command line; the host in canonical form
    (`schemas.netaddr`) when it is one, else as written.

    The authority is read as URL parsers read it: user info ends at its last ``@``
    (``http://allowed.com@169.254.169.254/`` goes to 169.254.169.254). A backslash ends the host
    for WHATWG parsers (browsers, fetch tools) but not for curl, so a URL with one yields both
    readings. A host made of shell syntax (``http://$HOST/``) is not known before the shell expands
    it and is left out."""
    out = []
    for m in _URL.finditer(text or ""):
        scheme, authority = m.group(1).lower(), m.group(2)
        readings = [authority.split("\\", 1)[0], authority] if "\\" in authority else [authority]
        for reading in readings:
            found = _host_port(reading, _DEFAULT_PORTS.get(scheme, 0))
            if found is not None and (scheme, *found) not in out:
                out.append((scheme, *found))
    return out


def _host_port(authority: str, default: int) -> tuple[str, int] | None:
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        host, port = host + "]", rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    try:
        host = parse_host(host).text
    except HostError:
        if not host or _SHELL_SYNTAX & set(host):
            return None
        host = host.strip("[]")
    return host, int(port) if port.isdigit() and port.isascii() and len(port) <= 5 else default


def network_protocol(value: Any, port: int | None = None) -> str:
    a = str(value or "").lower().replace("-", "_")
    if a in ("https", "https_connect", "connect", "tls"):
        return "https"
    if a in ("http", "socks5_tcp", "socks5_udp", "tcp", "udp", "dns", "ssh", "git"):
        return a
    if port == 443:
        return "https"
    if port == 80:
        return "http"
    return "unknown"

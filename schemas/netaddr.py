"""Network destinations as the policy engine sees them: one reading of every spelling of a host.

An agent's tools reach an address by many spellings, and a rule written for ``169.254.169.254``
must hold for all of them. `parse_host` turns a host as a URL, a ``CONNECT`` target, a trace or a
recorded event gives it into a `Host`: a canonical address, or a canonical name. It is the only
place that reads hosts; the policy (`schemas.policy`), and through it the sandbox's egress proxy,
the hook's URL check and what-if, all decide on its result, so they cannot disagree.

Address forms read (each maps to the address the C library, curl and browsers connect to):

* IPv4 the way ``inet_aton(3)`` and the WHATWG URL standard (what curl follows) read it: one to four
  dot-separated parts, each decimal, octal (leading ``0``) or hex (``0x``), the last part filling
  the remaining bytes: ``2852039166``, ``0251.0376.0251.0376``, ``0xa9fea9fe``, ``127.1``,
  ``0x7f.1``; one trailing dot.
* IPv6, bracketed or not, with a zone id (``fe80::1%eth0``, ``[fe80::1%25eth0]``; the zone is
  dropped); an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``, ``::ffff:7f00:1``) *is* its IPv4
  address (a dual-stack socket connects to it).
* Percent-encoding (``%31%32%37.0.0.1``), upper case, full-width digits and dots (the IDNA / UTS #46
  mapping, as browsers and curl's libidn2 apply it; `idna`).

A host that ends in a number but is not a valid IPv4 address (``1.2.3.256``, ``08.0.0.1``,
``1.2.3.4.5``) is rejected, not guessed (the WHATWG rule; ``inet_aton`` refuses them too, and no
name can end in a number). Anything else that is not a plausible DNS name is rejected as well.

`aliases` gives the addresses an address also reaches, which address rules match too: the IPv4
address embedded in an IPv4-compatible (``::a.b.c.d``), NAT64 well-known-prefix
(``64:ff9b::/96``, RFC 6052) or 6to4 (``2002::/16``) address, and the local host for the
unspecified addresses (``0.0.0.0`` and ``::`` connect to the local host on Linux).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_LOCAL_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOCAL_V6 = ipaddress.IPv6Address("::1")
_DIGITS = {8: re.compile(r"[0-7]*"), 10: re.compile(r"[0-9]+"), 16: re.compile(r"[0-9a-fA-F]+")}
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


class HostError(ValueError):
    """Not a host: a destination no rule can be said to match (decided as a denial)."""


@dataclass(frozen=True)
class Host:
    """A destination host in canonical form: ``text`` is the address (IPv6 without brackets,
    compressed) or the lower-case ASCII name without a trailing dot."""
    text: str
    address: IPAddress | None = None
    zone: str | None = None  # an IPv6 zone id, kept for connecting, never for deciding

    @property
    def is_address(self) -> bool:
        return self.address is not None


def parse_host(raw: str) -> Host:
    """The canonical `Host` of ``raw`` (see the module docstring); `HostError` when it is none."""
    if not isinstance(raw, str):
        raise HostError(f"not a host: {raw!r}")
    text = raw.strip()
    if "%" in text:  # percent-encoding, decoded once (as URL parsers do)
        try:
            text = unquote(text, errors="strict")
        except UnicodeDecodeError:
            raise HostError(f"percent-encoding that is not UTF-8: {raw!r}") from None
    if not text:
        raise HostError("empty host")
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise HostError(f"unbalanced brackets in {raw!r}")
        return _ipv6(text[1:-1], raw)
    if ":" in text:
        return _ipv6(text, raw)
    if not text.isascii():
        text = idna_ascii(text, raw)
    text = text.lower()
    labels = text.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot: the root
    if _ends_in_number(labels[-1]):
        address = _ipv4(labels, raw)
        return Host(str(address), address)
    if len(text) > 254 or not all(_LABEL.fullmatch(label) and len(label) <= 63 for label in labels):
        raise HostError(f"not a valid host name: {raw!r}")
    return Host(".".join(labels))


def parse_address(raw: str) -> IPAddress:
    """The canonical address of an address literal in any form; `HostError` for a name."""
    host = parse_host(raw)
    if host.address is None:
        raise HostError(f"not an address: {raw!r}")
    return host.address


def canonical(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as its IPv4 address; IPv6 without a zone id."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


def aliases(address: IPAddress) -> tuple[IPAddress, ...]:
    """``address`` and the addresses it also reaches (see the module docstring)."""
    address = canonical(address)
    out = [address]
    if isinstance(address, ipaddress.IPv4Address):
        if address.is_unspecified:
            out.append(_LOCAL_V4)
        return tuple(out)
    if address.is_unspecified:
        out += [_LOCAL_V6, _LOCAL_V4]
    elif address in _NAT64 or (address in _COMPAT and address != _LOCAL_V6):
        out.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    elif address.sixtofour is not None:
        out.append(address.sixtofour)
    return tuple(out)


def canonical_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped IPv6 range (``::ffff:127.0.0.0/104``) as its IPv4 range, which is what the
    addresses it names are compared as."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def is_loopback(address: IPAddress) -> bool:
    return any(a.is_loopback for a in aliases(address))


# -- the pieces ------------------------------------------------------------------------------

def _ipv6(text: str, raw: str) -> Host:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise HostError(f"not a valid IPv6 address: {raw!r} ({exc})") from None
    zone = address.scope_id
    canon = canonical(address)
    return Host(str(canon), canon, zone if isinstance(canon, ipaddress.IPv6Address) else None)


def idna_ascii(text: str, raw: str | None = None) -> str:
    """A non-ASCII host as ASCII: IDNA 2008 with the UTS #46 mapping (case, full-width digits and
    dots, compatibility forms), as curl's libidn2 and browsers convert it. `HostError` if invalid."""
    import idna  # only for non-ASCII hosts: the hook's path stays light

    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise HostError(f"not a valid name: {raw or text!r} ({exc})") from None


def _ends_in_number(label: str) -> bool:
    """The WHATWG URL standard's test: the last label is all digits, or a 0x hex number."""
    if label.isdigit() and label.isascii():
        return True
    return label[:2] == "0x" and re.fullmatch(r"[0-9a-f]*", label[2:]) is not None


def _number(part: str) -> int:
    if part[:2] in ("0x", "0X"):
        base, digits = 16, part[2:]
    elif len(part) > 1 and part[0] == "0":
        base, digits = 8, part[1:]
    else:
        base, digits = 10, part
    if not _DIGITS[base].fullmatch(digits):
        raise ValueError(part)
    return int(digits, base) if digits else 0


def _ipv4(parts: list[str], raw: str) -> ipaddress.IPv4Address:
    """inet_aton(3) / WHATWG IPv4 parsing of the dot-separated ``parts``."""
    if len(parts) > 4 or any(p == "" for p in parts):
        raise HostError(f"ends in a number but is not an IPv4 address: {raw!r}")
    try:
        numbers = [_number(p) for p in parts]
    except ValueError:
        raise HostError(f"ends in a number but is not an IPv4 address: {raw!r}") from None
    last = numbers.pop()
    if any(n > 255 for n in numbers) or last >= 256 ** (4 - len(numbers)):
        raise HostError(f"ends in a number but is not an IPv4 address: {raw!r} (a part is too large)")
    value = last
    for i, n in enumerate(numbers):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


__all__ = ["Host", "HostError", "IPAddress", "aliases", "canonical", "canonical_network", "is_loopback",
           "parse_address", "parse_host"]

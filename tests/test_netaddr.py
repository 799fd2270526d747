"""Every spelling of an address is one address to the policy (schemas/netaddr.py), and a policy's
address rules hold for all of them: in `Policy.evaluate_network` (the proxy and what-if) and in
the hook's URL check (`Policy.evaluate_shell_call`)."""

from __future__ import annotations

import socket

import pytest

from sandbox_support import NO_LOCAL
from agentledger.schemas.errors import ConfigError
from agentledger.schemas.policy import Policy, urls_in

# (as written, canonical address)
FORMS = [
    ("169.254.169.254", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),               # one 32-bit integer
    ("0251.0376.0251.0376", "169.254.169.254"),      # octal parts
    ("0xa9fea9fe", "169.254.169.254"),               # one hex number
    ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),      # hex parts, upper case
    ("0xa9.254.0251.0xfe", "169.254.169.254"),       # mixed bases
    ("169.16689662", "169.254.169.254"),             # a.b: the last part fills three bytes
    ("169.254.43518", "169.254.169.254"),            # a.b.c: the last part fills two bytes
    ("00000251.0376.0251.0376", "169.254.169.254"),  # leading zeros are octal, not padding
    ("169.254.169.254.", "169.254.169.254"),         # the root's trailing dot
    ("%31%36%39.254.169.254", "169.254.169.254"),    # percent-encoded
    ("１６９．２５４．１６９．２５４", "169.254.169.254"),   # full-width digits and dots (IDNA mapping)
    ("127.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),
    ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("::ffff:127.0.0.1", "127.0.0.1"),               # IPv4-mapped IPv6 is the IPv4 address
    ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("::ffff:7f00:1", "127.0.0.1"),
    ("0:0:0:0:0:ffff:7f00:1", "127.0.0.1"),
    ("[::FFFF:A9FE:A9FE]", "169.254.169.254"),
    ("::ffff:169.254.169.254", "169.254.169.254"),
    ("[0000:0000:0000:0000:0000:0000:0000:0001]", "::1"),
    ("::1", "::1"),
    ("[fe80::1%25eth0]", "fe80::1"),                  # a zone id (URL-encoded) is not part of the address
    ("fe80::1%eth0", "fe80::1"),
    ("[FE80::0:1]", "fe80::1"),
    ("64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:a9fe"),    # NAT64: its own address (and see ALIASES)
]

# addresses that also reach an IPv4 address (or the local host): address rules match them too
ALIASES = [
    ("::127.0.0.1", "127.0.0.1"),                    # IPv4-compatible (deprecated)
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),       # NAT64 well-known prefix, RFC 6052
    ("64:ff9b::169.254.169.254", "169.254.169.254"),
    ("2002:a9fe:a9fe::1", "169.254.169.254"),        # 6to4
    ("0.0.0.0", "127.0.0.1"),                        # the unspecified address connects to the local host
    ("::", "::1"),
]

JUNK = ["1.2.3.256", "256.1.1.1", "4294967296", "0x100000000", "08.0.0.1", "0x7g.1", "1.2.3.4.5",
        "127.0.0.1..", "1..2.3", "0x", "[::1", "::1]", "[1.2.3.4]", "::ffff:0x7f.1", "::g", "1:2:3:4:5:6:7:8:9",
        "", " ", "a..b", "$HOST", "ex ample.com", "%ff%fe", "host/path", "user@host", "[fe80::1%]"]


@pytest.mark.parametrize("written,canonical", FORMS)
def test_every_spelling_of_an_address_reads_as_one_address(written, canonical):
    from agentledger.schemas.netaddr import parse_host

    h = parse_host(written)
    assert h.is_address and str(h.address) == canonical == h.text


def test_the_forms_agree_with_the_c_library():
    """What inet_aton(3) reads (the tools an agent runs connect through it) is read the same way."""
    from agentledger.schemas.netaddr import parse_host

    checked = 0
    for written, canonical in FORMS:
        try:
            libc = socket.inet_ntoa(socket.inet_aton(written))
        except OSError:
            continue  # not an inet_aton form (IPv6, percent-encoding, full width, trailing dot)
        assert libc == canonical == str(parse_host(written).address), written
        checked += 1
    assert checked >= 18
    for junk in JUNK:
        if junk.strip() and all(c in "0123456789abcdefx." for c in junk):
            with pytest.raises(OSError):
                socket.inet_aton(junk)


@pytest.mark.parametrize("junk", JUNK)
def test_junk_is_rejected_not_guessed(junk):
    from agentledger.schemas.netaddr import HostError, parse_host

    with pytest.raises(HostError):
        parse_host(junk)


@pytest.mark.parametrize("written,reaches", ALIASES)
def test_embedded_and_unspecified_addresses_reach_what_they_embed(written, reaches):
    from agentledger.schemas.netaddr import aliases, parse_address

    assert reaches in {str(a) for a in aliases(parse_address(written))}


def test_names_are_canonical_and_never_addresses():
    from agentledger.schemas.netaddr import parse_host

    assert parse_host("LocalHost.").text == "localhost" and not parse_host("localhost").is_address
    assert parse_host("BÜCHER.example").text == "xn--bcher-kva.example"
    assert parse_host("straße.example").text == "xn--strae-oqa.example"  # IDNA 2008 (UTS #46), as curl and browsers
    assert Policy.from_toml('[[network.rules]]\nid = "x"\naction = "deny"\nhosts = ["*.bücher.example"]'
                            ).evaluate_network("www.xn--bcher-kva.example", 443).rule == "x"
    assert parse_host("1.2.3.4.example").text == "1.2.3.4.example"  # a name: it does not end in a number
    assert parse_host("0x7f.example").text == "0x7f.example"


@pytest.mark.parametrize("written,canonical", FORMS + ALIASES)
def test_an_address_rule_holds_for_every_spelling(written, canonical):
    p = Policy.from_toml(NO_LOCAL)
    d = p.evaluate_network(written, 80, "http")
    assert (d.action, d.rule) == ("deny", "no-local"), (written, d)
    host = f"[{written.strip('[]')}]" if ":" in written else written
    shell = p.evaluate_shell_call(["sh", "-c", f"curl -s http://{host}:8080/latest/meta-data/"])
    assert (shell.action, shell.rule) == ("forbidden", "no-local"), (written, shell)


def test_a_host_that_is_no_host_is_denied_and_names_are_decided_by_their_addresses():
    p = Policy.from_toml(NO_LOCAL)
    assert p.evaluate_network("1.2.3.256", 80).rule == "network.invalid_host"
    assert p.evaluate_network("1.2.3.256", 80).action == "deny"
    assert p.evaluate_network("localhost", 80).action == "allow"  # a name on its own: address rules cannot see it
    d = p.evaluate_network("localhost", 80, addresses=["127.0.0.1"])
    assert (d.action, d.rule) == ("deny", "no-local") and "resolved to 127.0.0.1" in d.reason
    # every address counts: one denied address denies the name
    assert p.evaluate_network("mixed.example", 80, addresses=["93.184.215.14", "::ffff:127.0.0.1"]).action == "deny"
    assert p.evaluate_network("public.example", 80, addresses=["93.184.215.14"]).action == "allow"
    # a literal is decided as itself, whatever addresses come with it
    assert p.evaluate_network("0x7f.1", 80, addresses=["93.184.215.14"]).action == "deny"


def test_host_rules_given_as_addresses_are_address_rules():
    p = Policy.from_toml("""
[network]
default = "deny"
[[network.rules]]
id = "local-app"
action = "allow"
hosts = ["127.0.0.1", "pypi.org"]
ports = [8080]
[[network.rules]]
id = "mapped-range"
action = "deny"
cidrs = ["::ffff:10.0.0.0/104"]
""")
    assert p.evaluate_network("0x7f.1", 8080).rule == "local-app"
    assert p.evaluate_network("[::ffff:127.0.0.1]", 8080).rule == "local-app"
    assert p.evaluate_network("app.internal", 8080, addresses=["127.0.0.1"]).rule == "local-app"
    assert p.evaluate_network("PyPI.org.", 8080).rule == "local-app"
    assert p.evaluate_network("10.1.2.3", 8080).rule == "mapped-range"
    with pytest.raises(ConfigError, match="not an IPv4 address"):
        Policy.from_toml('[[network.rules]]\nid = "x"\naction = "deny"\nhosts = ["1.2.3.256"]')


URLS = [
    ("curl -s http://[::ffff:127.0.0.1]:18080/", [("http", "127.0.0.1", 18080)]),
    ("curl http://2852039166/", [("http", "169.254.169.254", 80)]),
    ("curl http://allowed.example@169.254.169.254/x", [("http", "169.254.169.254", 80)]),
    ("curl http://a@b@0xa9fea9fe:8080", [("http", "169.254.169.254", 8080)]),
    ("curl HTTP://%31%32%37.0.0.1/", [("http", "127.0.0.1", 80)]),
    ("curl http://169.254.169.254#@allowed.example/", [("http", "169.254.169.254", 80)]),
    # WHATWG parsers end the host at a backslash, curl does not: both readings count
    ("curl 'http://169.254.169.254\\@allowed.example/'",
     [("http", "169.254.169.254", 80), ("http", "allowed.example", 80)]),
    ("curl http://[fe80::1%25eth0]:80/", [("http", "fe80::1", 80)]),
    ("git clone https://github.com/x/y", [("https", "github.com", 443)]),
    ("curl http://$HOST:8080/ http://${H}/", []),  # not known before the shell expands it
]


@pytest.mark.parametrize("command,expected", URLS)
def test_urls_in_a_command_line_are_read_as_url_parsers_read_them(command, expected):
    assert urls_in(command) == expected

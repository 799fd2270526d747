"""Redaction recall benchmark: a seeded corpus of secret forms and of look-alikes that are not secrets.

    python bench/redaction.py [--seed 7] [--variants 3] [--smoke]

The corpus is generated, never collected: every secret is random, in the shape of a real one.

* ``provider``: one sample per rule of the vendored gitleaks ruleset (producers/rulesets), generated
  from the rule's own regex and kept only if the rule itself accepts it (entropy, allowlists) --
  i.e. every provider format with a published pattern -- plus hand-made real-shaped keys (GitHub,
  GitLab, Google, AWS, Slack, Stripe, OpenAI, Anthropic, npm, PyPI, SendGrid, ...) in commands.
* ``assignment``: ``export PGPASSWORD=``, ``MYSQL_PWD=``, ``*_TOKEN=``, ``*_SECRET=``, ``*_KEY=``, .env
  lines, YAML, JSON, INI, ``-Ddb.password=``, ``docker run -e``, ``kubectl --from-literal``.
* ``cli_flag``: password / token flags of common tools in shell strings (``mysql -pX``, ``curl -u
  u:p``, ``sshpass -p``, ``docker login -p``, ``redis-cli -a``, ``--password=``, ``--token X``, ...).
* ``split_argv``: the same flags as argv lists with the secret in the next item (``-p`` ``PASS``).
* ``url``: URL userinfo, secret query parameters, tokens as the URL user.
* ``url_encoded``: the secret percent-encoded (``p%40ss``) in URLs, form bodies and query strings.
* ``header``: ``Authorization: Bearer/Basic/token``, ``X-Api-Key``, ``Private-Token``, ``Cookie``.
* ``json_output``: secrets inside JSON strings of command output, also JSON escaped inside JSON.
* ``pem``: private key blocks (RSA, EC, OpenSSH, PGP, encrypted), whole and cut short by an excerpt.
* ``jwt``: JSON Web Tokens in headers, cookies, env and output.

A sample is *found* when no piece of its secret of 12 characters (or the whole secret, if shorter)
is left in clear, in any spelling the sample used (plain, percent-encoded, JSON-escaped).

Negatives: git SHAs (``git log``, ``commit=``, short SHAs), UUIDs (request / session / trace ids),
digests (``sha256:`` image digests, ``sha256sum`` lines, pip ``--hash``, npm ``integrity``,
``go.sum``, ETags); any redaction in one is a *false redaction*.

Last line, JSON: {"samples", "found", "recall", "families": {family: {"samples", "found", "recall"}},
"provider_rules": {"rules", "generated", "found", "recall", "ungenerated"}, "negatives",
"false_redactions", "missed" (first 25), "false_examples", "us_per_sample"} and, with
``--baseline PATH``, the same numbers of another checkout's redactor on the same corpus.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import re._constants as C  # noqa: E402
import re._parser as P  # noqa: E402

from agentledger.producers.redact import TOKEN_RE, Redactor, default_ruleset  # noqa: E402

AN = string.ascii_letters + string.digits
HEX = "0123456789abcdef"


@dataclass
class Sample:
    family: str
    text: str | list[str]  # a string, or an argv list
    secret: str
    spellings: tuple[str, ...] = ()  # other spellings of the secret present in the text
    label: str = ""
    # per character of ``secret``: a literal of its format (the same in every key of the format,
    # e.g. ``https://hooks.slack.com/services/``), not secret material; empty: all secret material
    public: tuple[bool, ...] = ()


def rnd(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def password(rng: random.Random) -> str:
    """A human-ish password: letters, digits and one symbol that needs no shell quoting."""
    return rnd(rng, string.ascii_letters, 5) + rnd(rng, string.digits, 3) + rng.choice("!%+#^") + rnd(rng, string.ascii_lowercase, 2)


def token(rng: random.Random, n: int = 32) -> str:
    return rnd(rng, AN, n)


# -- samples from the rules' own regexes ----------------------------------------------------------
_WORD = string.ascii_letters + string.digits + "_"
_CATEGORY = {"CATEGORY_DIGIT": string.digits, "CATEGORY_NOT_DIGIT": string.ascii_letters, "CATEGORY_WORD": _WORD,
             "CATEGORY_NOT_WORD": " .,;:/-", "CATEGORY_SPACE": " ", "CATEGORY_NOT_SPACE": AN}


def _class_chars(items, rng: random.Random) -> str:
    allowed: list[str] = []
    negate = False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            allowed.append(chr(av))
        elif op is C.RANGE:
            lo, hi = av
            allowed.extend(chr(c) for c in range(lo, min(hi, lo + 200) + 1))
        elif op is C.CATEGORY:
            allowed.extend(_CATEGORY[str(av)])
    if negate:
        pool = [c for c in AN + " .,;:/-_" if c not in allowed] or [" "]
    else:
        pool = [c for c in allowed if c.isprintable() and c not in "\n\r\t\x0b\x0c"] or allowed
    return rng.choice(pool)


def _gen(items, rng: random.Random, groups: dict) -> list[tuple[str, bool]]:
    """A string the regex matches, as (character, public) pairs: public characters are the regex's
    literals (a provider's fixed prefix such as ``pscale_oauth_``, ``https://hooks.slack.com/``), the
    same for every key of that format; the others are random, the secret material."""
    out: list[tuple[str, bool]] = []
    for op, av in items:
        if op is C.LITERAL:
            out.append((chr(av), True))
        elif op is C.NOT_LITERAL:
            out.append((rng.choice([c for c in AN if c != chr(av)]), False))
        elif op is C.ANY:
            out.append((rng.choice(AN), False))
        elif op is C.IN:
            out.append((_class_chars(av, rng), False))
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            top = lo + 12 if hi == C.MAXREPEAT else hi
            n = lo if op is C.MIN_REPEAT else rng.randint(lo, min(top, lo + 12))
            for _ in range(n):
                out.extend(_gen(sub, rng, groups))
        elif op is C.SUBPATTERN:
            gid, _, _, sub = av
            g = _gen(sub, rng, groups)
            if gid:
                groups[gid] = g
            out.extend(g)
        elif op is C.BRANCH:
            out.extend(_gen(rng.choice(av[1]), rng, groups))
        elif op is C.CATEGORY:
            out.append((rng.choice(_CATEGORY[str(av)]), False))
        elif op is C.GROUPREF:
            out.extend(groups.get(av, []))
        # AT (anchors), ASSERT / ASSERT_NOT (look-arounds): nothing to generate
    return out


def rule_sample(rule, index: int, rng: random.Random, tries: int = 300) -> tuple[str, str, tuple[bool, ...]] | None:
    """(text, secret, public) that ``rule`` itself reports, or None if none was found in ``tries``;
    ``public``: per character of the secret, whether it is a literal of the rule's format."""
    rules = default_ruleset()
    tree = P.parse(rule.pattern, rule.flags)
    for _ in range(tries):
        chars = _gen(tree, rng, {})
        s = "".join(c for c, _ in chars)
        text = f"{s} "
        if rule.keywords and not any(k in text.lower() for k in rule.keywords):
            text = f"{rng.choice(rule.keywords)} {text}"  # gitleaks runs a rule only where a keyword is
        found = rules.find(text, [index])
        if found:
            f, off = found[0], len(text) - len(s) - 1
            public = tuple(chars[i - off][1] if 0 <= i - off < len(chars) else True for i in range(f.start, f.end))
            return text, f.secret, public
    return None


# -- hand-made families ---------------------------------------------------------------------------
def provider_keys(rng: random.Random) -> list[tuple[str, str]]:
    """(label, key) for common providers, in their published shapes."""
    b32 = string.ascii_uppercase + "234567"
    return [
        ("github classic", "ghp_" + token(rng, 36)), ("github oauth", "gho_" + token(rng, 36)),
        ("github fine-grained", "github_pat_" + token(rng, 22) + "_" + token(rng, 59)),
        ("gitlab pat", "glpat-" + rnd(rng, AN + "_-", 20)), ("google api key", "AIza" + rnd(rng, AN + "_-", 35)),
        ("aws access key id", "AKIA" + rnd(rng, b32, 16)), ("slack bot", f"xoxb-{rng.randint(10**10, 10**11)}-"
                                                                        f"{rng.randint(10**11, 10**12)}-{token(rng, 24)}"),
        ("stripe live", "sk_live_" + token(rng, 24)), ("openai project", "sk-proj-" + rnd(rng, AN + "_-", 74) + "T3BlbkFJ" +
                                                       rnd(rng, AN + "_-", 74)),
        ("anthropic", "sk-ant-api03-" + rnd(rng, AN + "_-", 93) + "AA"), ("npm", "npm_" + token(rng, 36)),
        ("pypi", "pypi-AgEIcHlwaS5vcmc" + rnd(rng, AN + "_-", 60)),
        ("sendgrid", "SG." + rnd(rng, AN + "_-", 22) + "." + rnd(rng, AN + "_-", 43)),
        ("twilio", "SK" + rnd(rng, HEX, 32)), ("huggingface", "hf_" + rnd(rng, string.ascii_letters, 34)),
        ("digitalocean", "dop_v1_" + rnd(rng, HEX, 64)), ("shopify", "shpat_" + rnd(rng, "abcdef0123456789", 32)),
        ("doppler", "dp.pt." + rnd(rng, AN, 43)), ("age", "AGE-SECRET-KEY-1" + rnd(rng, "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L", 58)),
        ("databricks", "dapi" + rnd(rng, HEX, 32)), ("grafana", "glsa_" + token(rng, 32) + "_" + rnd(rng, HEX, 8)),
    ]


def samples(rng: random.Random, variants: int) -> tuple[list[Sample], dict]:
    out: list[Sample] = []
    # provider: every gitleaks rule from its own regex
    rules = default_ruleset()
    prov = {"rules": 0, "generated": 0, "ungenerated": []}
    for i, r in enumerate(rules.rules):
        if r.source != "gitleaks":
            continue
        prov["rules"] += 1
        got = rule_sample(r, i, random.Random(f"{rng.random()}:{r.id}"))
        if got is None:
            prov["ungenerated"].append(r.id)
            continue
        prov["generated"] += 1
        out.append(Sample("provider", got[0], got[1], label=f"gitleaks:{r.id}", public=got[2]))
    contexts = ["{}", "export API_CREDENTIAL={}", "echo {} | tee ~/.config/tool/creds", "curl -s https://api.example.com/v1/x?k={}",
                '{{"result": {{"apiKey": "{}"}}}}', "deploy --auth {} --env prod", "Found key {} in .env.local"]
    for v in range(variants):
        for label, key in provider_keys(rng):
            ctx = contexts[(v + len(label)) % len(contexts)]
            out.append(Sample("provider", ctx.format(key), key, label=label))

    for _ in range(variants):
        pw, tk = password(rng), token(rng, rng.randint(20, 40))
        # assignment
        for tpl, sec in [("export PGPASSWORD={}", pw), ("MYSQL_PWD={} mysql -u root app", pw), ("export GITLAB_TOKEN={}", tk),
                         ("APP_SECRET={}", tk), ("STRIPE_WEBHOOK_KEY={}", tk), ("DB_PASSWORD='{}'", pw),
                         ('DATABASE_PASS="{}"', pw), ("password: {}", pw), ("  client_secret: {}", tk),
                         ('{{"password": "{}", "user": "admin"}}', pw), ("java -Ddb.password={} -jar app.jar", pw),
                         ("docker run -e POSTGRES_PASSWORD={} postgres:16", pw),
                         ("kubectl create secret generic db --from-literal=password={}", pw),
                         ("[database]\npassword = {}\nhost = db", pw), ("SLACK_SIGNING_SECRET={}", tk),
                         ("export AWS_SESSION_TOKEN={}", tk), ("heroku config:set API_KEY={}", tk),
                         ("dbPassword={}", pw), ("env | grep TOKEN\nCI_JOB_TOKEN={}", tk)]:
            out.append(Sample("assignment", tpl.format(sec), sec, label=tpl.split("{")[0][:30]))
        # cli flags in shell strings
        pw, tk, user = password(rng), token(rng, 28), rnd(rng, string.ascii_lowercase, 6)
        for tpl, sec in [("mysql -u root -p{} app", pw), ("mysqldump -uroot -p{} --all-databases > all.sql", pw),
                         ("curl -u {}:{} https://api.example.com/", pw), ("curl --user {}:{} https://x", pw),
                         ("sshpass -p '{}' ssh deploy@host", pw), ("docker login -u ci -p {} registry.example.com", pw),
                         ("redis-cli -a {} ping", pw), ("sqlcmd -S db -U sa -P {} -Q 'select 1'", pw),
                         ("zip -P {} secrets.zip notes.txt", pw), ("7z a -p{} out.7z dir", pw),
                         ("ldapsearch -x -D cn=admin -w {} -b dc=ex", pw), ("ssh-keygen -t ed25519 -N {} -f k", pw),
                         ("smbclient //srv/share -U {}%{}", pw), ("openssl pkcs12 -export -passout pass:{} -out a.p12", pw),
                         ("keytool -list -keystore ks.jks -storepass {}", pw), ("psql --password={} -h db", pw),
                         ("deploy --token {} --prod", tk), ("tool --api-key={}", tk), ("az login -u me -p {}", pw),
                         ("gh secret set NPM_TOKEN --body {}", tk), ("npm config set //registry.npmjs.org/:_authToken {}", tk),
                         ("aws configure set aws_secret_access_key {}", tk), ("htpasswd -b .htpasswd admin {}", pw),
                         ("http -a {}:{} POST https://api.example.com/x", pw), ("mongosh --username app -p {} db", pw),
                         ("cf login -a api.example.com -u me -p {}", pw), ("sudo mysql -p{} -e 'show databases'", pw),
                         ("docker exec -it db mysql -uroot -p{}", pw), ("xfreerdp /u:admin /p:{} /v:host", pw),
                         ("helm repo add x https://charts.example.com --password {}", pw),
                         ("wget --http-password={} https://files.example.com/x", pw),
                         ("vault login {}", "hvs." + token(rng, 24)), ("terraform apply -var client_secret={}", tk)]:
            text = tpl.format(user, sec) if tpl.count("{}") == 2 else tpl.format(sec)
            out.append(Sample("cli_flag", text, sec, label=tpl.split("{")[0][:30]))
        # split across argv items
        pw, tk = password(rng), token(rng, 30)
        for argv, sec in [(["mysql", "-u", "root", "-p", pw, "app"], pw), (["mysql", "--password", pw], pw),
                          (["curl", "-u", f"admin:{pw}", "https://x"], pw), (["curl", "--user", f"me:{pw}", "https://x"], pw),
                          (["sshpass", "-p", pw, "ssh", "h"], pw), (["docker", "login", "--password", pw, "r.io"], pw),
                          (["docker", "login", "-p", pw], pw), (["redis-cli", "-a", pw], pw), (["deploy", "--token", tk], tk),
                          (["gh", "auth", "login", "--hostname", "x", "--git-protocol", "ssh", "--secret", tk], tk),
                          (["env", f"PGPASSWORD={pw}", "psql", "-h", "db"], pw), (["keytool", "-storepass", pw], pw),
                          (["openssl", "enc", "-k", pw, "-in", "a"], pw), (["zip", "-P", pw, "a.zip", "b"], pw),
                          (["ldapsearch", "-w", pw], pw), (["smbclient", "-U", f"admin%{pw}", "//s/x"], pw),
                          (["sqlcmd", "-P", pw], pw), (["tool", "--client-secret", tk], tk),
                          (["bash", "-lc", f"mysql -uroot -p{pw} -e 'select 1'"], pw)]:
            out.append(Sample("split_argv", argv, sec, label=" ".join(argv[:2])))
        # URLs
        pw, tk = password(rng), token(rng, 40)
        for tpl, sec in [("git clone https://deploy:{}@git.example.com/acme/app.git", pw),
                         ("pip install --index-url https://user:{}@pypi.example.com/simple pkg", pw),
                         ("psql postgresql://app:{}@db.internal:5432/app", pw), ("redis://:{}@cache:6379/0", pw),
                         ("https://hooks.example.com/notify?channel=ops&token={}", tk),
                         ("GET /api/v1/items?api_key={}&page=2", tk), ("https://{}@github.com/acme/app.git", tk),
                         ("mongodb+srv://svc:{}@cluster0.example.net/db", pw),
                         ("https://s3.amazonaws.com/b/o?X-Amz-Signature={}&X-Amz-Expires=60", rnd(rng, HEX, 64))]:
            out.append(Sample("url", tpl.format(sec), sec, label=tpl[:30]))
        # URL-encoded
        pw = password(rng) + "@/:"
        enc = urllib.parse.quote(pw, safe="")
        tk = "ghp_" + token(rng, 36)
        for tpl, sec, spelled in [("https://u:{}@host.example.com/x", pw, enc), ("curl -d 'user=me&password={}' https://x/login", pw, enc),
                                  ("https://app.example.com/cb?next=%2Fhome&token={}", pw, enc),
                                  ("redirect_uri=https%3A%2F%2Fx%2F%3Fapi_key%3D{}", tk, urllib.parse.quote(tk, safe="")),
                                  ("--data-urlencode password={}", pw, enc),
                                  ("DATABASE_URL=postgres://app:{}@db/app", pw, enc)]:
            out.append(Sample("url_encoded", tpl.format(spelled), sec, spellings=(spelled,), label=tpl[:30]))
        # headers
        tk, pw = token(rng, 40), password(rng)
        basic = base64.b64encode(f"admin:{pw}".encode()).decode()
        for tpl, sec in [("curl -H 'Authorization: Bearer {}' https://api", tk), ('-H "Authorization: token {}"', tk),
                         ("Authorization: Basic {}", basic), ("curl -H 'X-Api-Key: {}' https://api", tk),
                         ("curl --header 'PRIVATE-TOKEN: {}' https://gitlab.example.com/api/v4/projects", tk),
                         ("> Cookie: session={}", tk), ("< set-cookie: sid={}; Path=/; HttpOnly", tk),
                         ("git -c http.extraHeader='Authorization: Bearer {}' clone https://x", tk),
                         ("X-Vault-Token: {}", tk), ('{{"headers": {{"Authorization": "Bearer {}"}}}}', tk)]:
            out.append(Sample("header", tpl.format(sec), sec, label=tpl[:30]))
        # JSON in output
        tk, pw = token(rng, 36), password(rng)
        inner = json.dumps({"password": pw, "user": "svc"})
        for text, sec, sp in [(json.dumps({"access_token": tk, "token_type": "Bearer", "expires_in": 3600}), tk, ()),
                              (json.dumps({"data": inner}), pw, (json.dumps(pw)[1:-1],)),
                              (json.dumps({"credentials": {"secretAccessKey": tk}}), tk, ()),
                              (json.dumps({"env": [{"name": "DB_PASSWORD", "value": pw}]}), pw, ()),
                              (json.dumps({"items": [{"client_secret": tk}]}, indent=2), tk, ()),
                              (json.dumps({"log": f"connecting with password={pw}"}), pw, ()),
                              (json.dumps({"config": json.dumps({"api_key": tk})}), tk, ())]:
            out.append(Sample("json_output", text, sec, spellings=sp, label=text[:30]))
        # PEM blocks
        body = "\n".join(rnd(rng, AN + "+/", 64) for _ in range(5))
        for kind in ("RSA PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY",
                     "PGP PRIVATE KEY BLOCK"):
            block = f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----"
            out.append(Sample("pem", f"$ cat key.pem\n{block}\n$ ", body.splitlines()[2], label=kind))
        out.append(Sample("pem", f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body[:150]}", body[70:140], label="cut short"))
        out.append(Sample("pem", json.dumps({"private_key": f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"}),
                          body.splitlines()[1], label="service account json"))
        # JWTs
        def b64(d: bytes) -> str:
            return base64.urlsafe_b64encode(d).rstrip(b"=").decode()
        jwt = (f"{b64(json.dumps({'alg': 'RS256', 'typ': 'JWT'}).encode())}."
               f"{b64(json.dumps({'sub': token(rng, 8), 'iat': 1767225600}).encode())}.{b64(rng.randbytes(64))}")
        for tpl in ("Authorization: Bearer {}", "export ID_TOKEN={}", "Cookie: jwt={}", '{{"id_token": "{}"}}', "token {} expired"):
            out.append(Sample("jwt", tpl.format(jwt), jwt, label=tpl[:20]))
    return out, prov


def negatives(rng: random.Random, variants: int) -> list[str]:
    out = []
    for _ in range(variants):
        sha, sha2 = rnd(rng, HEX, 40), rnd(rng, HEX, 40)
        d256, d512 = rnd(rng, HEX, 64), base64.b64encode(rng.randbytes(64)).decode()
        uid = "-".join(rnd(rng, HEX, n) for n in (8, 4, 4, 4, 12))
        out += [
            f"commit {sha}\nAuthor: Dev <dev@example.com>\n\n    fix: token refresh",
            f"{sha[:7]} fix: password reset flow\n{sha2[:7]} feat: api key rotation", f"HEAD is now at {sha[:7]} bump",
            f"commit={sha}", f"git checkout {sha}", f"git rev-parse HEAD\n{sha}", f"Merge: {sha[:7]} {sha2[:7]}",
            f"image: ghcr.io/acme/app@sha256:{d256}", f"Digest: sha256:{d256}", f"{d256}  dist/app-1.2.3.tar.gz",
            f"pkg==1.2.3 --hash=sha256:{d256}", f'"integrity": "sha512-{d512}"', f"golang.org/x/net v0.30.0 h1:{d512[:43]}=",
            f'ETag: "{rnd(rng, HEX, 32)}"', f"x-request-id: {uid}", f"request_id={uid}", f"session {uid} resumed",
            f'{{"trace_id": "{rnd(rng, HEX, 32)}", "span_id": "{rnd(rng, HEX, 16)}"}}', f"uuidgen\n{uid}",
            f"md5sum a.txt\n{rnd(rng, HEX, 32)}  a.txt", f"sha1: {sha}", f"checksum: sha256:{d256}",
            f"docker pull postgres@sha256:{d256}", f"resolved: https://registry.npmjs.org/x/-/x-1.0.0.tgz#{sha}",
            f"cache-key: {sha}-{d256[:16]}", f"traceparent: 00-{rnd(rng, HEX, 32)}-{rnd(rng, HEX, 16)}-01",
        ]
    return out


def leaked(out: str, sample: Sample) -> bool:
    out = TOKEN_RE.sub("\x00", out)  # a token's detector name may share letters with the secret
    for s in (sample.secret, *sample.spellings):
        n = min(12, len(s))
        for i in range(0, len(s) - n + 1):
            w = s[i:i + n]
            if sum(c.isalnum() for c in w) >= min(4, n) and w in out:  # (not a run of spaces the text has too)
                return True
    return False


def load_redactor(path: str | None):
    """Our Redactor, or the one of another checkout's producers/redact.py (a baseline)."""
    if path is None:
        return Redactor(b"bench-redaction-key")
    import importlib.util

    # The baseline's folder is loaded as a package of its own, so that its relative imports
    # (.normalize, .ruleset) are the baseline's modules, not ours.
    folder = Path(path).resolve().parent
    pkg_spec = importlib.util.spec_from_file_location(
        "baseline_producers", folder / "__init__.py", submodule_search_locations=[str(folder)])
    pkg = importlib.util.module_from_spec(pkg_spec)
    sys.modules["baseline_producers"] = pkg
    pkg_spec.loader.exec_module(pkg)
    mod = importlib.import_module("baseline_producers." + Path(path).stem)
    return mod.Redactor(b"bench-redaction-key")


def run(seed: int, variants: int, compare: str | None = None) -> dict:
    rng = random.Random(seed)
    red = load_redactor(compare)
    corpus, prov = samples(rng, variants)
    fams: dict[str, dict] = {}
    missed = []
    t0 = time.perf_counter()
    for s in corpus:
        if isinstance(s.text, list):
            outs = red.redact_argv(s.text, "payload.argv", [])
            out = "\x00".join(outs)
        else:
            out = red.scan(s.text)[0]
        f = fams.setdefault(s.family, {"samples": 0, "found": 0})
        f["samples"] += 1
        if leaked(out, s):
            missed.append({"family": s.family, "label": s.label, "text": s.text if isinstance(s.text, str) else " ".join(s.text)})
        else:
            f["found"] += 1
    dt = time.perf_counter() - t0
    for f in fams.values():
        f["recall"] = round(f["found"] / f["samples"], 4)
    negs = negatives(rng, variants)
    false = [(n, red.scan(n)[0]) for n in negs]
    false = [{"text": n[:120], "redacted": o[:160]} for n, o in false if o != n]
    prov_found = sum(1 for s in corpus if s.label.startswith("gitleaks:")) - \
        sum(1 for m in missed if m["label"].startswith("gitleaks:"))
    found = sum(f["found"] for f in fams.values())
    return {
        "seed": seed, "variants": variants, "samples": len(corpus), "found": found,
        "recall": round(found / len(corpus), 4), "families": fams,
        "provider_rules": {"rules": prov["rules"], "generated": prov["generated"], "found": prov_found,
                           "recall": round(prov_found / max(1, prov["generated"]), 4), "ungenerated": prov["ungenerated"]},
        "negatives": len(negs), "false_redactions": len(false), "false_examples": false[:10], "missed": missed[:25],
        "us_per_sample": round(dt / len(corpus) * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--variants", type=int, default=3, help="instances of each hand-made form")
    ap.add_argument("--smoke", action="store_true", help="one instance of each form")
    ap.add_argument("--baseline", metavar="REDACT_PY", help="also measure another checkout's producers/redact.py "
                    "on the same corpus (e.g. main's), reported under \"baseline\"")
    a = ap.parse_args()
    res = run(a.seed, 1 if a.smoke else a.variants)
    if a.baseline:
        base = run(a.seed, 1 if a.smoke else a.variants, a.baseline)
        res["baseline"] = {k: base[k] for k in ("recall", "families", "false_redactions", "us_per_sample")}
        res["baseline"]["provider_recall"] = base["provider_rules"]["recall"]
    for fam, f in sorted(res["families"].items()):
        print(f"{fam:12s} {f['found']:4d}/{f['samples']:<4d} recall {f['recall']:.3f}", file=sys.stderr)
    for m in res["missed"]:
        print(f"MISSED {m['family']}: {m['label']}: {m['text'][:140]!r}", file=sys.stderr)
    for x in res["false_examples"]:
        print(f"FALSE {x['text']!r} -> {x['redacted']!r}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()

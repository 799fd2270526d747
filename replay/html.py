"""A self-contained HTML timeline of one session, for auditors working offline.

One file, inline CSS and JavaScript, no external resource of any kind (event URLs are shown as
text, never as links). Families are coloured; each approval request is shown with its decision,
each command with its outcome and each network attempt with its decision; alerts are pinned to
the events they cite; the chain status, signatures and state digest are at the top.
"""

from __future__ import annotations

import html
import json
from typing import Any

from .timeline import FAMILY_COLOURS

_CSS = """
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#111827;background:#f9fafb}
header{padding:16px 24px;background:#111827;color:#f9fafb}header h1{margin:0 0 6px;font-size:20px}
header .meta{font-size:13px;color:#d1d5db}main{padding:16px 24px}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:13px;margin-right:8px}
.ok{background:#d1fae5;color:#065f46}.open{background:#dbeafe;color:#1e40af}.broken,.empty{background:#fee2e2;color:#991b1b}
.sig-valid{background:#d1fae5;color:#065f46}.sig-partial,.sig-unverified,.sig-simulator,.sig-none{background:#fef3c7;color:#92400e}.sig-bad{background:#fee2e2;color:#991b1b}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;margin:0 0 16px;padding:12px 16px}
section h2{font-size:16px;margin:0 0 8px}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #f3f4f6;vertical-align:top;font-size:13px}
th{background:#f9fafb;position:sticky;top:0}td.mono,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.fam{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
tr.ev:target,tr.ev.hl{background:#fef9c3}tr.chain-bad{background:#fee2e2}tr.chain-unverified{opacity:.6}
tr.alerted td:first-child{border-left:4px solid #dc2626}.alert{border-left:4px solid #dc2626;padding:6px 10px;margin:6px 0;background:#fef2f2}
.pin{display:inline-block;background:#dc2626;color:#fff;border-radius:10px;padding:0 6px;font-size:11px;margin-left:4px}
.filters label{margin-right:12px;cursor:pointer}.pair{color:#6b7280;font-size:12px}a.seq{color:#2563eb;text-decoration:none;cursor:pointer}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:8px}.kv{background:#f9fafb;border-radius:6px;padding:6px 10px}
.kv b{display:block;font-size:18px}.div-block{color:#991b1b;font-weight:600}.div-allow{color:#065f46;font-weight:600}
"""

_JS = """
document.querySelectorAll('.filters input').forEach(function(cb){cb.addEventListener('change',function(){
  var fam=cb.value,on=cb.checked;document.querySelectorAll('tr.ev[data-family="'+fam+'"]').forEach(function(r){r.style.display=on?'':'none';});});});
document.querySelectorAll('a.seq').forEach(function(a){a.addEventListener('click',function(e){e.preventDefault();
  var t=document.getElementById('seq-'+a.dataset.seq);if(!t)return;document.querySelectorAll('tr.hl').forEach(function(r){r.classList.remove('hl');});
  t.classList.add('hl');t.scrollIntoView({block:'center'});});});
document.getElementById('shown').textContent=document.querySelectorAll('tr.ev').length;
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _seq_link(s: Any) -> str:
    return f'<a class="seq" href="#seq-{int(s)}" data-seq="{int(s)}">#{int(s)}</a>' if s is not None else ""


def render(*, session_id: str, verification: dict, state: dict, timeline: list[dict], alerts: list[dict],
           whatif: dict | None = None, title: str | None = None, coverage: dict | None = None) -> str:
    v = verification
    status = v.get("status", "?")
    sig = v.get("signatures", "none")
    bad = f" — first bad seq {v['first_bad_seq']}: {_e(v.get('reason'))}" if v.get("first_bad_seq") is not None else ""
    sess = state.get("session", {}) or {}
    started = sess.get("started") or {}
    counts = state.get("counts", {})
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{_e(title or 'agentledger replay ' + session_id)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>Session {_e(session_id)}</h1><div class='meta'>",
        f"<span class='badge {_e(status)}' id='chain-status'>chain {_e(status)}{bad}</span>",
        f"<span class='badge sig-{_e(sig)}'>signatures {_e(sig)}"
        + (f" through seq {v['signed_through']}" if v.get("signed_through") is not None else "") + "</span>",
        f"{_e(started.get('agent'))} {_e(started.get('model'))} · cwd {_e(started.get('cwd'))} · "
        f"{_e(counts.get('events'))} events · {_e(counts.get('first_at'))} → {_e(counts.get('last_at'))}<br>",
        f"head seq {_e(v.get('head_seq'))} hash <span class='mono'>{_e(v.get('head_hash'))}</span> · "
        f"state digest <span class='mono' id='state-digest'>{_e(state.get('state_digest'))}</span>"
        f" · gaps {_e(v.get('gaps'))}",
        "</div></header><main>",
    ]
    if v.get("detail"):
        parts.append(f"<section><h2>Verification</h2><p>{_e(v.get('detail'))}</p></section>")
    cannot = (coverage or {}).get("cannot_prove") or []
    if cannot:  # what the sources that recorded the session cannot contain (issue 24)
        parts.append("<section id='coverage'><h2>This evidence cannot prove</h2><ul>"
                     + "".join(f"<li>{_e(line)}</li>" for line in cannot) + "</ul></section>")
    # overview
    parts.append("<section><h2>Overview</h2><div class='grid'>")
    for label, n in (("commands", len(state.get("processes", []))), ("files", len(state.get("files", []))),
                     ("approvals", len(state.get("approvals", []))), ("network attempts", len(state.get("network", []))),
                     ("sandbox denials", len(state.get("denials", []))), ("gaps", len(state.get("gaps", []))),
                     ("checkpoints", len(state.get("checkpoints", []))), ("alerts", len(alerts))):
        parts.append(f"<div class='kv'><b>{n}</b>{label}</div>")
    parts.append("</div></section>")
    # alerts
    if alerts:
        parts.append("<section id='alerts'><h2>Alerts</h2>")
        for a in alerts:
            ev = " ".join(_seq_link(s) for s in a.get("evidence_seqs", []))
            parts.append(f"<div class='alert' id='alert-{_e(a['alert_id'])}'><b>{_e(a.get('severity'))}</b> "
                         f"{_e(a.get('title') or a.get('source'))} — {_e(a.get('explanation'))}<br>evidence: {ev}</div>")
        parts.append("</section>")
    # what-if
    if whatif:
        s = whatif.get("summary", {})
        parts.append(f"<section id='whatif'><h2>What if: policy {_e(s.get('policy'))}</h2><p>{_e(s.get('requests'))} "
                     f"requests re-decided, {_e(s.get('divergences'))} would differ.</p>")
        if whatif.get("divergences"):
            parts.append("<table><tr><th>seq</th><th>request</th><th>recorded</th><th>new</th><th>rule</th><th>effect</th></tr>")
            for d in whatif["divergences"]:
                cls = "div-block" if d["effect"] in ("block", "refuse") else "div-allow"
                parts.append(f"<tr><td>{_seq_link(d['seq'])}</td><td class='mono'>{_e(d['request'])}</td>"
                             f"<td>{_e(d['recorded'])}</td><td class='{cls}'>{_e(d['new'])}</td><td>{_e(d['rule'])}</td>"
                             f"<td>{_e(d['effect'])}</td></tr>")
            parts.append("</table>")
        parts.append("</section>")
    # approvals paired
    if state.get("approvals"):
        parts.append("<section id='approvals'><h2>Approvals (request → decision)</h2><table><tr><th>requested</th>"
                     "<th>action</th><th>subject</th><th>risk</th><th>decided</th><th>decision</th><th>by</th><th>latency</th></tr>")
        for a in state["approvals"]:
            parts.append(f"<tr><td>{_seq_link(a['requested_seq'])}</td><td>{_e(a['action_kind'])}</td>"
                         f"<td class='mono'>{_e(a['subject'])}</td><td>{_e(a['risk'])}</td><td>{_seq_link(a['decided_seq'])}</td>"
                         f"<td>{_e(a['decision'])}</td><td>{_e(a['decided_by'])} {_e(a['decider'])}</td>"
                         f"<td>{_e(a['latency_ms'])}</td></tr>")
        parts.append("</table></section>")
    if state.get("destinations"):
        parts.append("<section id='network'><h2>Network destinations</h2><table><tr><th>destination</th><th>attempts</th>"
                     "<th>allowed</th><th>denied</th><th>asked</th><th>bytes in / out</th><th>first</th></tr>")
        for d in state["destinations"]:
            parts.append(f"<tr><td class='mono'>{_e(d['protocol'])} {_e(d['host'])}:{_e(d['port'])}</td><td>{d['attempts']}</td>"
                         f"<td>{d['allowed']}</td><td>{d['denied']}</td><td>{d['asked']}</td>"
                         f"<td>{d['bytes_in']} / {d['bytes_out']}</td><td>{_seq_link(d['first_seq'])}</td></tr>")
        parts.append("</table></section>")
    # timeline
    fams = sorted({e["family"] for e in timeline})
    parts.append("<section id='timeline'><h2>Timeline (<span id='shown'></span> events)</h2><div class='filters'>")
    for f in fams:
        parts.append(f"<label><input type='checkbox' value='{_e(f)}' checked> "
                     f"<span class='fam' style='background:{FAMILY_COLOURS.get(f, '#374151')}'>{_e(f)}</span></label>")
    parts.append("</div><table><tr><th>seq</th><th>time (UTC)</th><th>family</th><th>kind</th><th>what happened</th>"
                 "<th>pairs</th><th>chain</th></tr>")
    rule_of = {a["alert_id"]: a.get("source") or "alert" for a in alerts}
    for e in timeline:
        cls = f"ev chain-{e['chain']}" + (" alerted" if e["alerts"] else "")
        pins = "".join(f"<a class='pin' href='#alert-{_e(a)}'>{_e(rule_of.get(a, 'alert'))}</a>" for a in e["alerts"])
        pairs = " ".join(_seq_link(s) for s in e["related_seqs"])
        colour = FAMILY_COLOURS.get(e["family"], "#374151")
        chain = {"ok": "✔", "bad": "✘ first bad", "unverified": "?"}.get(e["chain"], e["chain"])
        parts.append(
            f"<tr class='{cls}' id='seq-{e['seq']}' data-family='{_e(e['family'])}' data-kind='{_e(e['kind'])}'>"
            f"<td>{e['seq']}</td><td class='mono'>{_e((e['occurred_at'] or '')[11:23])}</td>"
            f"<td><span class='fam' style='background:{colour}'>{_e(e['family'])}</span></td><td>{_e(e['kind'])}</td>"
            f"<td class='mono'>{_e(e['summary'])}{pins}</td><td class='pair'>{pairs}</td><td>{_e(chain)}</td></tr>")
    parts.append("</table></section>")
    data = json.dumps({"session_id": session_id, "verification": v, "state_digest": state.get("state_digest")},
                      ensure_ascii=True).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='replay-data'>{data}</script><script>{_JS}</script></main></body></html>")
    return "".join(parts)

"""Tables for humans read on the terminal they are printed on (JSON and CSV always carry everything)."""

from __future__ import annotations

import io

import pytest

from agentledger import output
from agentledger.output import Format, render_rows

SID = "019b76db-346b-7254-b0ae-e8bdd0f71c51"
HASH = "677b1ec149526033" + "ab" * 24


@pytest.fixture
def screen(monkeypatch):
    def make(width: int) -> io.StringIO:
        buf = io.StringIO()
        monkeypatch.setattr(output, "console", output._Console(file=buf, width=width, color_system=None))
        return buf
    return make


def test_a_table_that_fits_is_printed_whole(screen):
    buf = screen(200)
    render_rows(["session_id", "head_hash", "status"], [(SID, HASH, "ok")], Format.table)
    text = buf.getvalue()
    assert SID in text and HASH in text and "…" not in text


def test_a_narrow_terminal_shortens_ids_and_hashes_but_not_names(screen):
    buf = screen(80)
    render_rows(["session_id", "rule_id", "head_hash", "n"], [(SID, "credential-read-then-egress", HASH, 3)],
                Format.table)
    text = buf.getvalue()
    assert "019b76db-346b…" in text and SID not in text
    assert "677b1ec149526033…" in text
    assert "credential-read-then-egress" in text  # a rule id is a name, not a uuid
    assert all(len(line) <= 80 for line in text.splitlines())


def test_too_many_columns_for_the_terminal_become_one_block_per_row(screen):
    buf = screen(60)
    cols = [f"column_{i}" for i in range(9)]
    render_rows(cols, [[f"value {i} of row {r}" for i in range(9)] for r in range(2)], Format.table, title="wide")
    text = buf.getvalue()
    assert "row 1" in text and "row 2" in text
    for i in range(9):  # every column and value, unfolded, on a line of its own
        assert any(line.startswith(f"column_{i}") and f"value {i} of row 0" in line for line in text.splitlines())


def test_json_and_csv_are_never_shortened(screen, capsys):
    screen(40)
    render_rows(["session_id", "head_hash"], [(SID, HASH)], Format.json)
    render_rows(["session_id", "head_hash"], [(SID, HASH)], Format.csv)
    out = capsys.readouterr().out
    assert out.count(SID) == 2 and out.count(HASH) == 2


def test_recorded_control_characters_are_shown_not_sent_to_the_terminal(screen):
    """A recorded command is the agent's text: an escape sequence in it must not erase or rewrite
    the auditor's screen (nor a bidi override reorder it)."""
    buf = screen(200)
    evil = "rm -rf /\x1b[2K\x1b[1Gecho harmless\r\u202eexe.txt\x07"
    render_rows(["session_id", "command"], [(SID, evil)], Format.table)
    output.console.print(f"command: {evil}", markup=False)
    text = buf.getvalue()
    assert not any(c in text for c in "\x1b\r\u202e\x07")
    assert text.count("rm -rf /\\x1b[2K\\x1b[1Gecho harmless\\x0d\\u202eexe.txt\\x07") == 2


def test_recorded_text_is_never_rich_markup(screen):
    buf = screen(200)
    render_rows(["session_id", "command"], [(SID, "[link=https://evil.example]click[/link] [/] [bold red]x")],
                Format.table)
    assert "[link=https://evil.example]click[/link] [/] [bold red]x" in buf.getvalue()
    buf = screen(30)  # the expanded form too
    render_rows(["a", "b", "[red]c"], [("[/]", "x" * 40, "y")], Format.table)
    assert "[/]" in buf.getvalue() and "[red]c" in buf.getvalue()

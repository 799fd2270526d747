"""The native bundle decoder: the one place that runs ``agentledger-avro2arrow``.

``agentledger-avro2arrow`` (built from ``native/avro2arrow`` by ``scripts/bootstrap`` with cargo)
decodes an Avro object container of the event schema with arrow-avro, the Apache Arrow project's
Avro reader, into one Arrow IPC file per event kind, on two threads. For a bundle it also frames
the blocks and checks the hash chain on a third, exactly as the fast path of
`replay.chain.verify_spans` does. On a 1M-event bundle that is about 1.1 s where DuckDB's avro
reader plus the Python chain check take about 3.5 (docs/replay.md, "How fast, and what limits it").

It is an accelerator, never a dependency, and never the last word:

* it vouches for a chain only when the framing and every event are sound; anything else (damage,
  or just an unusual encoding) is framed and checked again by `replay.bundle.check_bundle`, which
  names what is wrong and where. The count, head and header checks are always made here;
* its rows are used only when there is one per framed event;
* when it is not installed, or fails on some input, replay decodes with DuckDB's avro reader and
  verifies in Python, with the same answers (tests/test_native.py holds both paths to that).

The bytes are handed over as a private copy, so what is decoded is exactly what was read (the file
on disk may have changed since).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agentledger.schemas.codec import SOE_MAGIC
from agentledger.schemas.native import (  # noqa: F401  (the names replay and its tests use)
    BINARY, ENV, NativeDecodeError, decoder, reader_schema, scratch_dir,
)


@dataclass
class Vouched:
    """What the decoder's ``--verify`` found: the block spans, and whether the framing and the whole
    chain are sound. It vouches only for a bundle sound throughout; anything else is for
    `replay.bundle.check_bundle` to work out."""

    spans: list[tuple[int, int]]
    framing_ok: bool
    chain_ok: bool
    head_seq: int
    head_hash: str

    @property
    def sound(self) -> bool:
        return self.framing_ok and self.chain_ok


@dataclass
class Decoded:
    files: dict[int, Path]  # union branch -> Arrow IPC file of that kind's events
    rows: int
    vouched: Vouched | None = None


class Decoding:
    """One run of the decoder over ``data`` (a whole object container, decoded with the reader
    schema ``schema``: the current one, see `reader_schema`), writing into ``workdir``. `kinds`
    yields each kind's file as soon as it is complete (so it can be loaded while the next is
    written); `result` then waits for the summary. With ``bundle`` (a
    `replay.bundle.Bundle` over ``data``), the decoder also frames its blocks and checks its chain
    from the header's first seq, prev hash and session id, on another thread. A context manager:
    the process is reaped (killed when still running) on exit. Raises `NativeDecodeError`."""

    def __init__(self, data: bytes, schema: dict, workdir: Path, *, bundle=None, timeout: float | None = None):
        exe = decoder()
        if exe is None:
            raise NativeDecodeError(f"{BINARY} is not installed (scripts/bootstrap builds it when cargo is present)")
        self.workdir = workdir = Path(workdir)
        rs = workdir / "reader.avsc"
        rs.write_text(json.dumps(reader_schema(schema), separators=(",", ":")))
        # The bytes go through a private file in ``workdir`` (in memory where /dev/shm exists): a
        # pipe costs more, and the original file may have changed since ``data`` was read from it.
        src = workdir / "input.avro"
        try:
            with open(src, "wb") as f:
                f.write(data)
        except OSError as exc:  # e.g. a full /dev/shm: DuckDB's reader is used instead
            raise NativeDecodeError(f"cannot hand the bytes to {BINARY}: {exc}") from exc
        args = [str(exe), "--input", str(src), "--out-dir", str(workdir), "--reader-schema", str(rs)]
        self._spans_file = workdir / "spans.bin" if bundle is not None else None
        if bundle is not None:
            h = bundle.header
            try:
                first_seq = h.meta_int("first_seq")
                session_id, first_prev = h.meta("session_id"), h.meta("first_prev_hash")
            except Exception as exc:  # a damaged header: check_bundle reports it
                raise NativeDecodeError(f"the bundle header cannot be read: {exc}") from exc
            args += ["--verify", "--blocks-at", str(h.length), "--sync", h.sync.hex(),
                     "--soe-header", (SOE_MAGIC + bundle.fingerprint).hex(), "--session-id", session_id,
                     "--first-seq", str(first_seq), "--first-prev-hash", first_prev,
                     "--spans-out", str(self._spans_file)]
        try:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)
        except (OSError, ValueError) as exc:
            raise NativeDecodeError(f"{BINARY} did not run: {exc}") from exc
        # A bound on a stuck decoder (arrow-avro 60 loops on a block whose record ends before the
        # block does): about 40x what 1M events take here, then replay falls back to DuckDB's reader.
        if timeout is None:
            timeout = 10 + len(data) / 10e6
        self._timer = threading.Timer(timeout, self._proc.kill)
        self._timer.daemon = True
        self._timer.start()
        self._files: dict[int, Path] = {}
        self._summary: dict | None = None

    def _line(self) -> dict | None:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            err = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise NativeDecodeError(err[-1] if err else f"{BINARY} exited with {self._proc.returncode} "
                                    "before its summary")
        try:
            return json.loads(line)
        except ValueError as exc:
            raise NativeDecodeError(f"{BINARY} printed an unreadable line: {line[:200]!r}") from exc

    def kinds(self):
        """(union branch, Arrow IPC file) of each kind, as soon as its file is complete."""
        while self._summary is None:
            msg = self._line()
            if "kind" in msg:
                t = int(msg["kind"])
                self._files[t] = self.workdir / f"kind-{t}.arrow"
                yield t, self._files[t]
            else:
                self._summary = msg

    def result(self) -> Decoded:
        for _ in self.kinds():
            pass
        summary = self._summary
        try:
            kinds = {int(t): int(n) for t, n in summary["kinds"].items()}
            rows = int(summary["rows"])
            vouched = None
            if self._spans_file is not None:
                v = summary["verify"]
                flat = array("q")
                flat.frombytes(self._spans_file.read_bytes())
                if sys.byteorder != "little":
                    flat.byteswap()
                if len(flat) != 2 * int(v["events"]):
                    raise ValueError("the spans file does not hold the events it reports")
                vouched = Vouched(Spans(flat), v["framing_ok"] is True, v["chain_ok"] is True,
                                  int(v["head_seq"]), str(v["head_hash"]))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise NativeDecodeError(f"{BINARY} printed an unreadable summary: {summary!r:.200} ({exc})") from exc
        if sum(kinds.values()) != rows or set(kinds) != set(self._files):
            raise NativeDecodeError(f"{BINARY} reported {rows} rows but {sum(kinds.values())} by kind")
        return Decoded(dict(self._files), rows, vouched)

    def close(self) -> None:
        self._timer.cancel()
        if self._proc.poll() is None and self._summary is None:
            self._proc.kill()  # given up on: it must not write into the scratch directory being removed
        if self._proc.poll() is None:
            # The summary is printed before the process lets go of its memory: reap it later.
            threading.Thread(target=self._reap, daemon=True).start()
        else:
            self._reap()

    def _reap(self) -> None:
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._proc.stderr.close()

    def __enter__(self) -> "Decoding":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Spans(Sequence):
    """(body start, body end) of each block, over the flat array the decoder wrote (a list of a
    million tuples costs more to build than everything else the framing needs)."""

    def __init__(self, flat: array):
        self._flat = flat

    def __len__(self) -> int:
        return len(self._flat) // 2

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._flat[2 * i], self._flat[2 * i + 1]

"""What an importer found in one source file, counted so that nothing vanishes silently."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_NAMES = 50


@dataclass
class FileCounts:
    lines: int = 0  # complete lines read (blank ones included)
    blank: int = 0
    records: int = 0  # lines that parsed as JSON objects
    mapped: int = 0  # records that produced at least one observation
    ignored: int = 0  # known record types that carry nothing we record (messages, token counts, ...)
    invalid_json: int = 0
    too_long: int = 0  # lines over the importers' size limit (skipped unread, kept as rejects)
    too_deep: int = 0  # JSON nested deeper than the importers accept
    not_object: int = 0
    non_utf8: int = 0  # lines with bytes that are not UTF-8 (imported with U+FFFD in their place)
    no_session: int = 0  # records that name no session we could attribute them to
    orphans: int = 0  # outputs/results of a call whose start was never seen
    unknown_types: dict = field(default_factory=dict)
    unknown_fields: dict = field(default_factory=dict)
    unknown_values: dict = field(default_factory=dict)
    pending_tail_bytes: int = 0  # an unterminated last line, left for the next run

    def bump(self, table: str, name: str, n: int = 1) -> None:
        d = getattr(self, table)
        if name in d or len(d) < MAX_NAMES:
            d[name] = d.get(name, 0) + n
        else:
            d["(other)"] = d.get("(other)", 0) + n

    def unknown_keys(self, where: str, obj: dict, known: frozenset) -> None:
        for k in obj:
            if k not in known:
                self.bump("unknown_fields", f"{where}.{k}")

    def unknown_value(self, where: str, value) -> None:
        self.bump("unknown_values", f"{where}={str(value)[:60]}")

    @property
    def problems(self) -> int:
        return (self.invalid_json + self.too_long + self.too_deep + self.not_object + self.no_session + self.orphans
                + sum(self.unknown_types.values()))

    @property
    def recognised(self) -> int:
        """Records of the file's format (mapped or known and ignored): 0 means nothing usable."""
        return self.mapped + self.ignored

    def as_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    def add(self, other: "FileCounts") -> None:
        for k, v in other.__dict__.items():
            if isinstance(v, dict):
                for name, n in v.items():
                    self.bump(k, name, n)
            else:
                setattr(self, k, getattr(self, k) + v)

    @classmethod
    def from_dict(cls, d: dict | None) -> "FileCounts":
        c = cls()
        for k, v in (d or {}).items():
            if hasattr(c, k):
                setattr(c, k, dict(v) if isinstance(v, dict) else v)
        return c

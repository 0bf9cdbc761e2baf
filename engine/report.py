"""What a patch run did: every target patched, every entry skipped, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PatchedItem:
    spec: str
    entry: str
    kernel: str
    target: str
    scope: str  # "per-instance forward" or "process-wide function"
    modules: list[str] = field(default_factory=list)
    note: str | None = None  # e.g. that the probe ran on simulated weights

    @property
    def count(self) -> int:
        return max(1, len(self.modules))


@dataclass
class SkippedItem:
    spec: str
    entry: str
    target: str
    reason: str


@dataclass
class PatchReport:
    device: str
    model_type: str
    specs: list[str] = field(default_factory=list)
    patched: list[PatchedItem] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)

    def merge(self, other: PatchReport) -> None:
        self.specs += [s for s in other.specs if s not in self.specs]
        self.patched += other.patched
        self.skipped += other.skipped
        if self.device == "-":
            self.device = other.device

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for item, raw in zip(self.patched, data["patched"], strict=True):
            raw["count"] = item.count
        return data

    def summary(self) -> str:
        head = (
            f"engine: {self.model_type} on {self.device} (specs: {', '.join(self.specs) or 'none'}): "
            f"{len(self.patched)} patched, {len(self.skipped)} skipped"
        )
        lines = [head]
        for p in self.patched:
            where = f"{p.count} module(s)" if p.modules else "1 function"
            note = f"; {p.note}" if p.note else ""
            lines.append(f"  patched  {p.spec}/{p.entry}: {p.target} -> {p.kernel} [{where}, {p.scope}{note}]")
        for s in self.skipped:
            lines.append(f"  skipped  {s.spec}/{s.entry}: {s.target}: {s.reason}")
        return "\n".join(lines)

    __str__ = summary

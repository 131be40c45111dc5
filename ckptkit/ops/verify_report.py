"""What ``verify`` reports: findings and the report of one checkpoint or file.

Shared by the manifest check (:mod:`ckptkit.ops.verify`) and the structural checks of foreign
layouts (:mod:`ckptkit.ops.structural`), which the former runs; kept apart so neither imports
the other for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: which file, what kind, and for digests the byte range that is wrong."""

    path: str
    kind: str  # missing | size | digest | unlisted | manifest | incomplete
    message: str
    severity: Severity = "error"
    byte_range: tuple[int, int] | None = None


@dataclass
class VerifyReport:
    url: str
    status: str  # ok | failed | not-committed
    step: int | None = None
    layout: str | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    quick: bool = False
    seconds: float = 0.0
    # Without a manifest: how many files were recognised as checkpoint content by the
    # structural checks (None when a manifest was verified).
    checkpoint_files: int | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

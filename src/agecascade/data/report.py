"""The drop report: every input row a dataset run did not keep, and why.

Counts per rule are the interface. ``kept + sum(dropped) == input_rows`` always holds, so a
reader can check that nothing vanished between the raw dataset and the manifest.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agecascade.atomic import write_text_atomic


@dataclass
class DropReport:
    dataset: str
    root: str
    input_rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    dropped_files: list[dict] = field(default_factory=list)
    warning_files: list[dict] = field(default_factory=list)
    crops: dict = field(default_factory=dict)  # how the crop store was made (size, margin, ...)

    def drop(self, path: str, reason: str, detail: str = "") -> None:
        """Record one input row that will not reach the manifest."""
        self.dropped[reason] += 1
        self.dropped_files.append({"path": path, "reason": reason, "detail": detail})

    def warn(self, path: str, reason: str, detail: str = "") -> None:
        """Record something odd about a row that is still kept (e.g. no face found)."""
        self.warnings[reason] += 1
        self.warning_files.append({"path": path, "reason": reason, "detail": detail})

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def check_balance(self) -> None:
        """Fail loudly if a row was lost without a reason: that would be a bug, not bad data."""
        if self.kept + self.n_dropped != self.input_rows:
            raise AssertionError(
                f"{self.dataset}: kept {self.kept} + dropped {self.n_dropped} "
                f"!= input rows {self.input_rows}"
            )

    def counts(self) -> dict:
        """Flat numeric summary, suitable for `dvc metrics show`."""
        out = {"input_rows": self.input_rows, "kept": self.kept, "dropped": self.n_dropped}
        out.update({f"dropped.{k}": v for k, v in sorted(self.dropped.items())})
        out.update({f"warnings.{k}": v for k, v in sorted(self.warnings.items())})
        return out

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "input_rows": self.input_rows,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "warnings": dict(sorted(self.warnings.items())),
            "crops": self.crops,
            "dropped_files": self.dropped_files,
            "warning_files": self.warning_files,
        }

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few lines for the terminal; the full list lives in report.json."""
        lines = [f"{self.dataset}: {self.input_rows} input rows, {self.kept} kept, "
                 f"{self.n_dropped} dropped"]
        lines += [f"  dropped {reason:<28} {n}" for reason, n in sorted(self.dropped.items())]
        lines += [f"  warning {reason:<28} {n}" for reason, n in sorted(self.warnings.items())]
        return "\n".join(lines)

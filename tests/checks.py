"""Assertions shared by the test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import json
from pathlib import Path


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Byte-identical files; the merge reports differ only in timings and service details."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "merge_report.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "merge_report.json").read_text()) for d in (a, b))
    assert ra["shards"] == rb["shards"]

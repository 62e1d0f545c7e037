"""The loss a run should reach: that of the same architecture with one loop in its suite.

A looped model trained at K loops on the same data, seed and learning rate as its one-loop
cell has at least that model's capacity; ending far above it means the loops hurt. The
reference must itself have trained (a stable verdict), and is the EMA of its loss at its
last record (`final_smoothed_loss`, recomputed from the records for runs judged before that
field existed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loopdiag.detect.base import Ema
from loopdiag.detect.verdict import ONSET_EMA_SPAN
from loopdiag.store._files import SUITE_FILE, SUMMARY_FILE
from loopdiag.store.reader import read_records


def reference_run(suite_dir: str | Path, cell: dict[str, Any]) -> tuple[str, float] | None:
    """(run id, final smoothed loss) of the stable one-loop run of `cell`'s architecture,
    seed and lr in the suite at `suite_dir` (from its `suite.json`); None when `cell` has
    one loop itself, or that run is missing, unfinished or not stable."""
    if cell.get("n_loops") == 1:
        return None
    suite_dir = Path(suite_dir)
    try:
        manifest = json.loads((suite_dir / SUITE_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    for entry in manifest.get("runs", []):
        other = entry.get("cell", {})
        if other.get("n_loops") == 1 and all(other.get(key) == cell.get(key)
                                             for key in ("arch", "seed", "lr")):
            loss = stable_final_loss(suite_dir / entry["run_id"])
            return None if loss is None else (entry["run_id"], loss)
    return None


def stable_final_loss(run_dir: Path) -> float | None:
    """The run's final smoothed loss when it finished stable, else None."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "stable":
        return None
    loss = summary.get("final_smoothed_loss")
    if loss is None:
        ema = Ema(ONSET_EMA_SPAN)
        for record in read_records(run_dir):
            value = record.get("loss")
            if isinstance(value, (int, float)) and math.isfinite(value):
                ema.update(value)
        loss = ema.value
    return float(loss) if loss is not None and math.isfinite(loss) and loss > 0 else None

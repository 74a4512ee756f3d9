"""Where training metrics go: ``metrics.jsonl`` (one object per line) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from parallax.checkpoint import write_text_atomic


class MetricsLogger:
    """Appends ``{"step": s, **metrics}`` to RUN_DIR/metrics.jsonl and TensorBoard scalars.

    ``start_step`` is the step a resumed run continues from: what the run logged after it
    (past its last checkpoint, before it stopped) is logged again, so it is dropped first.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self._writer = None
        self._file = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(run_dir) / "metrics.jsonl"
            if start_step and path.is_file():
                drop_rows_after(path, start_step)
            # TensorBoard hides the earlier events from purge_step on
            self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1 if start_step else None)
            self._file = open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            self._writer.add_scalar(key.replace("_", "/", 1), value, step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._file.close()


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step``; a line cut short by a killed write goes too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(kept))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

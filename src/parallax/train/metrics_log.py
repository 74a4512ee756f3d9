"""Where training metrics go: ``metrics.jsonl`` (one object per line) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Appends ``{"step": s, **metrics}`` to RUN_DIR/metrics.jsonl and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._writer = None
        self._file = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir))
            self._file = open(Path(run_dir) / "metrics.jsonl", "a")

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


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

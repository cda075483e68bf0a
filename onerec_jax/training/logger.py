"""Run logging: metrics.jsonl, TensorBoard event files (tensorboardX) and a tqdm progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricLogger:
    """Appends `{"step", "time", metrics...}` lines to workdir/metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._file = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # only the writing process needs it

            workdir = Path(workdir)
            self._file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            if not name.endswith("_ci95"):  # TensorBoard tags may not hold "@"
                self._tb.add_scalar(name.replace("@", "_at_"), float(value), int(step))

    def progress(self, total: int, initial: int, enabled: bool = True) -> Progress:
        return Progress(total, initial, enabled and self.enabled)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()


class Progress:
    """tqdm bar over training steps showing the loss and tokens per second."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True
        )
        self._last = initial

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._last)
        self._last = step

    def close(self) -> None:
        self._bar.close()

"""Training metrics: one JSON line per logged step in logs/metrics.jsonl (always), and TensorBoard (when installed).

On resume, records that a crashed run wrote after the checkpoint being resumed are dropped from metrics.jsonl
(and TensorBoard purges them with ``purge_step``), so the files hold one curve without repeated steps.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from torch import Tensor

__all__ = ["MetricsLog"]

logger = logging.getLogger("ldm.train")


class MetricsLog:
    """Scalars to logs/metrics.jsonl (always) and TensorBoard (when installed); main process only."""

    def __init__(self, folder: Path, resume_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        if self.path.exists():  # drop records a crashed run wrote after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self.tb = None
            logger.info("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, images: Tensor, step: int) -> None:
        if self.tb is not None:
            self.tb.add_images(tag, images, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf  # an unreadable (half-written) record is dropped

"""What each served model really did: measured decode speed beside the prediction.

For: :class:`SpeedBook`, the daemon's record per model of the decode
tokens/s its requests measured (the last :data:`KEEP` requests long enough
to count) and of what the planner predicted for it, kept in
``DATA_DIR/daemon/speeds.json`` so a restarted daemon and ``qmesh quant plan
--explain`` on the same node see them. The planner uses a model's measured
median in place of its prediction once there is one (:func:`qmesh.daemon.
quant.plan`), the inventory reports both, and the error between them is
how the node's cost model is checked in production.

Only requests that ran alone count (a second generation on the same CPU or
GPU halves the speed of both) and only those of :data:`MIN_TOKENS` or more
(a handful of tokens says more about the clock than about the model).

Not for: predicting (:mod:`qmesh.daemon.speed`) or measuring a request
(:mod:`qmesh.daemon.infer` does, from the runtime's stream).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

__all__ = ["KEEP", "MIN_TOKENS", "Measured", "SpeedBook"]

log = logging.getLogger(__name__)

KEEP: Final = 20
MIN_TOKENS: Final = 16
CHANGE: Final = 0.05
"""A median that moves by more than this share is news for the Gate."""
FILE_NAME: Final = "speeds.json"


@attrs.frozen
class Measured:
    """One model's measured decode speeds and the prediction beside them."""

    model: str
    samples: tuple[float, ...]
    predicted_tps: float | None = None
    quantization: str | None = None
    updated_at: float = 0.0

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    @property
    def error(self) -> float | None:
        """(predicted − measured) ÷ measured: +0.2 means the prediction was 20 % high."""
        if not self.predicted_tps or not self.samples:
            return None
        return (self.predicted_tps - self.median) / self.median

    def to_json(self) -> dict[str, Any]:
        low, high = self.spread
        return {
            "model": self.model,
            "quantization": self.quantization,
            "predicted_tps": self.predicted_tps,
            "measured_tps": round(self.median, 3),
            "measured_min": round(low, 3),
            "measured_max": round(high, 3),
            "samples": [round(s, 3) for s in self.samples],
            "error": None if self.error is None else round(self.error, 4),
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measured:
        samples = tuple(float(s) for s in data["samples"] if float(s) > 0)
        if not samples:
            raise ValueError("no samples")
        predicted = data.get("predicted_tps")
        return cls(
            model=str(data["model"]),
            samples=samples[-KEEP:],
            predicted_tps=None if predicted is None else float(predicted),
            quantization=data.get("quantization"),
            updated_at=float(data.get("updated_at") or 0.0),
        )


class SpeedBook:
    """Measured speeds per model id, saved in ``directory`` (None: memory only)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = None if directory is None else directory / FILE_NAME
        self.models: dict[str, Measured] = {}
        self.dirty = False

    @classmethod
    def load(cls, directory: Path) -> SpeedBook:
        book = cls(directory)
        assert book.path is not None
        try:
            data = json.loads(book.path.read_text())
            for entry in data.get("models", []):
                try:
                    measured = Measured.from_json(entry)
                except (KeyError, TypeError, ValueError):
                    continue
                book.models[measured.model] = measured
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, RecursionError) as exc:
            log.warning("ignoring unreadable %s (%s)", book.path, exc)
        return book

    def get(self, model: str) -> Measured | None:
        return self.models.get(model)

    def record(
        self,
        model: str,
        tps: float,
        *,
        predicted_tps: float | None = None,
        quantization: str | None = None,
        now: float | None = None,
    ) -> bool:
        """Add one request's decode speed. True when the model's median
        moved enough (or this is its first) that the Gate should hear it."""
        if not tps > 0:
            return False
        before = self.models.get(model)
        samples = ((before.samples if before else ()) + (float(tps),))[-KEEP:]
        after = Measured(
            model=model,
            samples=samples,
            predicted_tps=predicted_tps if predicted_tps is not None else (
                before.predicted_tps if before else None
            ),
            quantization=quantization or (before.quantization if before else None),
            updated_at=time.time() if now is None else now,
        )  # fmt: skip
        self.models[model] = after
        self.dirty = True
        return before is None or abs(after.median - before.median) > CHANGE * before.median

    def forget(self, keep: Iterable[str]) -> None:
        """Drop models that are no longer on the node."""
        wanted = set(keep)
        for model in list(self.models):
            if model not in wanted:
                del self.models[model]
                self.dirty = True

    def save(self) -> None:
        """Write the book (blocking: call from a worker thread in Trio code)."""
        if self.path is None:
            return
        self.dirty = False
        data = {"models": [m.to_json() for m in self.models.values()]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save measured speeds to %s: %s", self.path, exc)

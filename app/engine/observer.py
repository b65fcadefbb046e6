"""How the engine reports what it does, without knowing who listens (metrics, tests)."""

from __future__ import annotations

from typing import Protocol


class EngineObserver(Protocol):
    def batch_ran(self, model: str, images: int, inference_s: float, waits_s: list[float]) -> None:
        """A batch of ``images`` computed in ``inference_s``; each image waited ``waits_s``."""

    def image_dropped(self, model: str, reason: str) -> None:
        """An image left the queue without being computed (deadline, cancelled)."""


class NullObserver:
    def batch_ran(self, model: str, images: int, inference_s: float, waits_s: list[float]) -> None:
        pass

    def image_dropped(self, model: str, reason: str) -> None:
        pass

"""IMGCLS_MAX_BATCH_SIZE=auto: each model's workers time batch sizes at warm-up and the batcher
uses the fastest; /models reports it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.engine import batchsize
from app.settings import AUTO_BATCH_CAP, Settings
from tests.conftest import CIFAR_FILES, CIFAR_SAMPLE, CIFAR_WEIGHTS, needs_shared, run_service


class CostModel:
    """A run whose duration follows a per-size cost table, on a clock of its own, so the choice
    of the picker is exact (the real timing is exercised by the service test below)."""

    def __init__(self, ms_per_batch: dict[int, float], first_ms: float = 0.0) -> None:
        self.ms = ms_per_batch
        self.first_ms = first_ms  # extra on the first pass at each size (a compile)
        self.now = 0.0
        self.sizes: list[int] = []

    def run(self, bs: int) -> None:
        self.now += self.ms[bs] / 1000.0 + (0 if bs in self.sizes else self.first_ms / 1000.0)
        self.sizes.append(bs)

    def clock(self) -> float:
        return self.now


def test_picks_the_fastest_and_stops_past_the_peak():
    # images/s: 1 -> 40, 2 -> 50, 4 -> 66.7, 8 -> 80, 16 -> 72.7 (past the peak: 32 never runs)
    m = CostModel({1: 25, 2: 40, 4: 60, 8: 100, 16: 220, 32: 500})
    got = batchsize.pick(m.run, 32, clock=m.clock)
    assert got.best == 8
    assert 32 not in m.sizes and set(got.images_per_s) == {1, 2, 4, 8, 16}


def test_ties_go_to_the_smaller_batch():
    # 4 -> 100 images/s, 8 -> 101 (within MIN_GAIN): 4 is kept
    m = CostModel({1: 20, 2: 30, 4: 40, 8: 79.2, 16: 200})
    assert batchsize.pick(m.run, 16, clock=m.clock).best == 4


def test_budget_bounds_the_search():
    m = CostModel({1: 100, 2: 150, 4: 250, 8: 450, 16: 850, 32: 1650})
    got = batchsize.pick(m.run, 32, budget_s=1.0, round_s=0.3, clock=m.clock)
    assert max(got.images_per_s) < 32 and m.now < 1.0 + 3 * 0.85 + 1.65


def test_first_passes_do_not_spend_the_budget():
    """The first pass at a size compiles its graph on the CPU (seconds): the budget counts only
    the timed passes, so slow compiles do not cut the search short of the peak."""
    m = CostModel({1: 25, 2: 40, 4: 60, 8: 100, 16: 220, 32: 500}, first_ms=5000)
    got = batchsize.pick(m.run, 32, budget_s=4.0, clock=m.clock)
    assert got.best == 8 and set(got.images_per_s) == {1, 2, 4, 8, 16} and 32 not in m.sizes
    # the timed passes still spend it: slow sizes stop the search within the budget
    m = CostModel({1: 100, 2: 150, 4: 250, 8: 450, 16: 850, 32: 1650}, first_ms=5000)
    got = batchsize.pick(m.run, 32, budget_s=1.0, round_s=0.3, clock=m.clock)
    assert set(got.images_per_s) == {1, 2, 4}


def test_setting_accepts_auto_and_integers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("IMGCLS_MAX_BATCH_SIZE", raising=False)
    assert Settings().max_batch_size == "auto"  # the default: measured per model and device
    monkeypatch.setenv("IMGCLS_MAX_BATCH_SIZE", "auto")
    s = Settings()
    assert s.max_batch_size == "auto" and s.batch_cap == AUTO_BATCH_CAP
    monkeypatch.setenv("IMGCLS_MAX_BATCH_SIZE", "8")
    assert Settings().batch_cap == 8
    monkeypatch.setenv("IMGCLS_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
def test_auto_batch_size_is_measured_and_reported(tmp_path: Path):
    file = CIFAR_FILES["cifar10_resnet20"]
    (tmp_path / file).symlink_to(CIFAR_WEIGHTS / file)
    with run_service(models="cifar10_resnet20", weights_dir=tmp_path, max_batch_size="auto") as svc:
        entry = httpx.get(f"{svc.url}/models/cifar10_resnet20").json()
        size = entry["batch_size"]
        assert size in batchsize.candidates(AUTO_BATCH_CAP)
        assert svc.service.batchers["cifar10_resnet20"].max_batch_size == size
        img = next(CIFAR_SAMPLE.glob("cat/*.jpg")).read_bytes()
        r = httpx.post(
            f"{svc.url}/classify",
            params={"model": "cifar10_resnet20"},
            files={"file": ("c.jpg", img)},
        )
        assert r.status_code == 200, r.text
    print(f"cifar10_resnet20 (fp32 eager): auto batch size {size}")
    with run_service(models="cifar10_resnet20", weights_dir=tmp_path, max_batch_size=4) as svc:
        assert httpx.get(f"{svc.url}/models/cifar10_resnet20").json()["batch_size"] == 4

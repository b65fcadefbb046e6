"""The collector's permanent generation (app/memory.settle): objects that live as long as the
process are frozen after start-up and after each load, so that Python's periodic full collection
does not walk them while requests wait (up to 0.2 s in the API process, 0.3 s in a worker), and
what is dropped later (an unloaded or failed compiled model) is still collected."""

from __future__ import annotations

import gc
import weakref

import pytest

from app import memory
from app.catalog import build_catalog
from app.engine.worker import Runner, WorkerConfig
from tests.conftest import CIFAR_FILES, CIFAR_WEIGHTS, needs_shared, run_service


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_settle_collects_the_garbage_then_freezes_what_is_left():
    garbage, kept = Node(), Node()
    dead, alive = weakref.ref(garbage), weakref.ref(kept)
    del garbage
    memory.settle()
    assert dead() is None  # collected first, not frozen with the rest
    assert gc.get_freeze_count() > 0 and alive() is not None
    # a plain full collection no longer reaches a frozen cycle
    held = weakref.ref(kept)
    del kept
    gc.collect()
    assert held() is not None
    # memory.collect does, and freezes the rest again
    memory.collect()
    assert held() is None
    assert gc.get_freeze_count() > 0
    memory.unsettle()
    assert gc.get_freeze_count() == 0


def test_collect_leaves_an_unfrozen_process_unfrozen():
    cycle = weakref.ref(Node())
    memory.collect()
    assert cycle() is None and gc.get_freeze_count() == 0


def test_the_service_freezes_its_start_up_objects_while_it_serves():
    assert gc.get_freeze_count() == 0
    with run_service(models="resnet18", allow_random_weights=True, wait_ready=False):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0  # handed back: the process (this test's) goes on


@needs_shared(CIFAR_WEIGHTS)
def test_unloading_a_compiled_model_frees_it_though_the_worker_froze_it():
    """A worker settles after each load; unloading must still free the compiled graphs (a
    regression guard: today they go by reference counts, and ``Runner.unload``'s full collection
    reaches the frozen objects too, should a cycle hold them)."""
    name = "cifar10_resnet20"
    plan = build_catalog().get(name).load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[name]))
    runner = Runner(WorkerConfig(0, "cpu", "fp32", False, True, 1, 1, []))
    assert runner.load(plan) == "inductor"
    generated = [weakref.ref(m) for m in runner.models[name].generated]
    assert generated
    memory.settle()  # as worker._load does
    runner.unload(name)
    assert [ref() for ref in generated] == [None] * len(generated)
    assert gc.get_freeze_count() > 0  # the worker's objects frozen again

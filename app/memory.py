"""Hand the memory of large, short-lived buffers back to the system.

glibc's malloc keeps freed memory in its arenas for reuse, and after a large free it raises its
mmap threshold (up to 32 MB), so the next large buffers come from the arenas too: after a few
40-megapixel decodes the API process and a worker each kept about 460 MB they no longer used
(issue 16). ``malloc_trim(0)`` returns the free pages of every arena. It takes milliseconds, so it
runs only after a buffer of ``TRIM_AFTER_BYTES`` or more was released, one caller at a time
(others skip: the trim in progress covers them), and never on an event loop's thread, which it
would stall for every connection (a thread of its own runs it there). Elsewhere than glibc it
does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("imgcls.memory")

TRIM_AFTER_BYTES = 16 * 1024 * 1024

_lock = threading.Lock()
_trim: Callable[[int], int] | None = None
_loaded = False


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim, _loaded
    if not _loaded:
        _loaded = True
        try:
            fn = ctypes.CDLL("libc.so.6").malloc_trim  # releases the GIL while it runs
        except (OSError, AttributeError):  # not glibc (musl, macOS)
            return None
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        _trim = fn
    return _trim


def trim() -> bool:
    """Return free heap memory to the system now; False where not possible or already running."""
    fn = _malloc_trim()
    if fn is None or not _lock.acquire(blocking=False):
        return False
    try:
        fn(0)
    finally:
        _lock.release()
    return True


def after_large_buffer(nbytes: int) -> None:
    """Call after dropping a buffer of ``nbytes``: trims when it was a large one; called on an
    event loop, on a thread of its own, and returns at once."""
    if nbytes < TRIM_AFTER_BYTES:
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # a worker's or the decode pool's thread: trim here
        trim()
        return
    if not _lock.locked():  # a trim in progress covers this buffer too
        threading.Thread(target=trim, name="imgcls-heap-trim", daemon=True).start()


def settle() -> None:
    """After the API process has started, or after a worker has loaded a model: collect the
    garbage once, then move every object left into the collector's permanent generation
    (``gc.freeze``).

    A process that has imported torch and FastAPI holds ~400,000 objects that live as long as it
    does, a worker that has compiled a model more. Objects of requests in flight survive the young
    generations' collections, so every ~10 s under load Python ran a full collection that walked
    all of them: 160-200 ms in the API process with its event loop stopped, 300 ms in a worker
    after compiling; both cohorts of clients then waited (resnet50 on 2 cores with AMX, 32
    clients: p99 1.7x p50). Frozen objects are not walked. ``gc.unfreeze`` first, so that what
    became garbage among them since the last call is collected now."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def collect() -> None:
    """A full collection that reaches the frozen objects too (a model was dropped: what it held
    may sit in reference cycles); they are frozen again after it if they were."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()


def unsettle() -> None:
    """Hand the frozen objects back to the collector (the service stops; its process may go on,
    as a test's does)."""
    gc.unfreeze()

"""What went wrong, as a status: one mapping from exceptions to HTTP-like codes for both doors.

The REST door answers ``{"error": message}`` with the status, the gRPC door maps the status to a
gRPC code. Client mistakes are 4xx, overload and models that are not ready 503 (with a retry
hint), passed deadlines 504; anything else is a 500 whose message gives nothing away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app import errors
from app.catalog import UnknownModelError
from app.engine.batcher import NoWorkerError, QueueFullError
from app.engine.pool import WorkerCrashedError
from app.imaging import ImageError, ImageTooLargeError

log = logging.getLogger("imgcls.oip")


class ProtocolError(Exception):
    """A request the protocol refuses: 400 (bad tensors, parameters or body), 404 (no such
    model version), 413 (request too large), 415 (unsupported encoding), 501 (not supported)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Failure:
    status: int
    message: str
    retry_after: int | None = None
    internal: bool = False


def failure(exc: BaseException) -> Failure:
    """The status and message for any exception, from the core's mapping where it has one."""
    if isinstance(exc, ProtocolError):
        return Failure(exc.status, str(exc))
    core = getattr(errors, "describe", None)
    if core is not None:
        described = core(exc)
        return Failure(
            described.status, described.message, described.retry_after, described.internal
        )
    return _describe(exc)  # TEMP until core lands (app.errors.describe, issue 11)


def _describe(exc: BaseException) -> Failure:
    """TEMP until core lands: the service's own exception-to-status mapping (app/errors.py)."""
    if isinstance(exc, ImageTooLargeError | errors.UploadTooLargeError):
        return Failure(413, str(exc))
    if isinstance(exc, ImageError):
        return Failure(400, str(exc))
    if isinstance(exc, errors.UploadError):
        return Failure(exc.status, str(exc))
    if isinstance(exc, UnknownModelError | errors.ModelNotServedError):
        return Failure(404, str(exc))
    if isinstance(exc, errors.InvalidParameterError):
        return Failure(422, str(exc))
    if isinstance(exc, errors.ModelNotReadyError):
        return Failure(503, str(exc), exc.retry_after)
    if isinstance(exc, QueueFullError):
        return Failure(503, str(exc), 1)
    if isinstance(exc, NoWorkerError):
        return Failure(503, str(exc), 2)
    if isinstance(exc, WorkerCrashedError):
        return Failure(503, f"{exc}; retry shortly", 2)
    if isinstance(exc, TimeoutError):
        return Failure(504, f"request deadline passed: {exc}" if str(exc) else "request timed out")
    log.error("inference failed", exc_info=exc)
    return Failure(500, "internal error; the server log has the details", internal=True)

"""What went wrong, in the protocol's terms, for both doors.

The status of an exception is the core's (``app.errors.describe``, the service's one mapping);
this module only adds the protocol's own refusals (``ProtocolError``), answers 400 where the core
says 422 (the protocol's status for a bad shape or value is 400), and for a server fault logs the
exception and answers the generic message with the request id. The REST door writes the result as
``{"error": message}`` with the status, the gRPC door as the status's gRPC code.
"""

from __future__ import annotations

import dataclasses
import logging

from app.errors import Failure, describe

log = logging.getLogger("imgcls.oip")


class ProtocolError(Exception):
    """A request the protocol refuses: 400 (bad tensors, parameters or body), 404 (no such
    model version), 413 (request too large), 415 (unsupported encoding); or the core's failure
    of one element of a request, restated with the element's tensor name (any status)."""

    def __init__(
        self, message: str, status: int = 400, retry_after: int | None = None, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.close = close  # the body was not read to its end: answer with Connection: close


def failure(exc: BaseException) -> Failure:
    """The status and message for any exception (no logging: see ``answer``)."""
    if isinstance(exc, ProtocolError):
        return Failure(exc.status, str(exc), exc.retry_after, close=exc.close)
    why = describe(exc)
    return dataclasses.replace(why, status=400) if why.status == 422 else why


def answer(exc: BaseException, request_id: str, where: str) -> Failure:
    """``failure(exc)`` for the client; a server fault is logged with its traceback and answered
    with the generic message and ``request_id`` to find it in the log."""
    why = failure(exc)
    if not why.internal:
        return why
    log.error(
        "request %s failed: %s", request_id, exc, exc_info=exc,
        extra={"fields": {"request_id": request_id, "path": where}},
    )  # fmt: skip
    return dataclasses.replace(why, message=f"{why.message} (request id {request_id})")

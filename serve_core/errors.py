"""The error hierarchy of serve_core.

Every error a caller can see derives from :class:`ServeError` and carries the HTTP
status the HTTP front answers with, so errors are mapped to responses in one place.
Validation errors also subclass the built-in a caller would expect::

    ServeError (500)                         alias: RayServeException
    ├── ServeStateError (500, RuntimeError)  instance not running / already stopped
    │   └── ShuttingDownError (503)          shutdown under way: no new calls, queued ones cut at the drain's end
    ├── ValidationError (400, ValueError)    bad argument value
    │   ├── BatchAnnotationError             max_batch_size on a non-batch backend
    │   └── ConflictError (409)              redefinition of a tag, name or route
    ├── ServeTypeError (400, TypeError)      wrong kind of argument
    ├── NotFoundError (404, KeyError)        unknown endpoint or backend
    │   └── MethodNotFoundError              call method missing or private
    ├── MethodNotAllowedError (405)          HTTP method not served by the route
    ├── PayloadTooLargeError (413)           HTTP body past the configured limit
    ├── WebOnlyAccessError (500, AttributeError)  request used outside a web call
    ├── BatchResultError (500)               batch backend returned the wrong shape
    ├── ReplicaDiedError (500)               replica crashed while holding the call
    │   └── NotDeliveredError                replica gone before the call reached it (requeued)
    ├── BackPressureError (503)              queue full, retry later
    ├── LoopBackError (508)                  composed call only its own waiting chain could serve
    ├── DeadlineExceededError (504, TimeoutError)  SLO passed before the call ran
    │   └── RequestTimeoutError              HTTP request not answered in time
    ├── ClientClosedRequest (499)            HTTP client went away; its call was cancelled
    └── StoreError (500)                     KV store failure
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class of every serve_core error."""

    status_code: int = 500


RayServeException = ServeError


class ServeStateError(ServeError, RuntimeError):
    """The instance is not in a state that allows the call (e.g. it was shut down)."""


class ShuttingDownError(ServeStateError):
    """The instance is shutting down: it takes no new calls (HTTP 503), and fails what is
    still queued or in flight when the drain time is over."""

    status_code = 503


class ValidationError(ServeError, ValueError):
    """An argument has an invalid value."""

    status_code = 400


class BatchAnnotationError(ValidationError):
    """``max_batch_size`` was set on a backend not marked with ``@accept_batch``."""


class ConflictError(ValidationError):
    """A name, tag or route is already defined differently."""

    status_code = 409


class ServeTypeError(ServeError, TypeError):
    """An argument has the wrong type (or positional arguments were given to ``remote``)."""

    status_code = 400


class NotFoundError(ServeError, KeyError):
    """An endpoint or backend is not registered."""

    status_code = 404

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MethodNotFoundError(NotFoundError):
    """The requested call method does not exist or is not public."""


class MethodNotAllowedError(ServeError):
    """The route exists but does not serve this HTTP method; ``allowed`` lists those it does."""

    status_code = 405

    def __init__(self, message: str, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed


class PayloadTooLargeError(ServeError):
    """The HTTP request body is larger than the instance accepts."""

    status_code = 413


class WebOnlyAccessError(ServeError, AttributeError):
    """The placeholder request of a Python call was used as a web request."""


class BatchResultError(ServeError):
    """A batch backend returned something other than a list of the batch's length."""


class ReplicaDiedError(ServeError):
    """The replica running the call died before answering."""


class NotDeliveredError(ReplicaDiedError):
    """The replica stopped or died before the call reached it: nothing of it ran.

    Executors fail such calls with this error; the router then puts their queries back
    in the queue for another replica instead of failing them.
    """


class BackPressureError(ServeError):
    """A bounded queue is full; the caller should retry later.

    ``retry_after_s`` is a hint of when a retry is likely to be admitted (HTTP ``Retry-After``):
    for a full backend queue, the runtime's estimate of how long the queue takes to drain at
    its recent service rate (1 to 60 s); 1 s when nothing better is known.
    """

    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LoopBackError(ServeError):
    """A call made inside a replica goes to a backend whose every slot is held by its own call chain.

    Those calls wait for this one, so it could never run: it is refused at once instead of
    waiting for ever (HTTP 508 Loop Detected; see docs/composition.md).
    """

    status_code = 508


class DeadlineExceededError(ServeError, TimeoutError):
    """The query's deadline passed before it could run."""

    status_code = 504


class RequestTimeoutError(DeadlineExceededError):
    """The HTTP front stopped waiting for an answer (``http_request_timeout_s``)."""


class StoreError(ServeError):
    """The KV store failed."""


class ClientClosedRequest(ServeError):
    """The HTTP client closed its connection while its call waited; the call was cancelled.

    Nobody reads the answer: the 499 (nginx's code for it) is for the access log.
    """

    status_code = 499

"""The one worker thread that drives a model, as both batchers run it.

The batch scheduler (`model.scheduler`) and the continuous batcher (`model.fast`) each own a
model that only their worker thread touches. The thread, the condition that wakes it, and how
it is stopped and how a request is cancelled are the same in both, so they live here: a
cancelled request is only marked (the worker drops it at its next step, under the lock), and
`stop` marks every request so that the worker ends each one before it exits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class Cancellable(Protocol):
    cancelled: bool


RequestT = TypeVar("RequestT", bound=Cancellable)


class WorkerThread(Generic[RequestT]):
    """A daemon thread running `_work`; subclasses name it and list their requests."""

    thread_name = "mllama-worker"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        raise NotImplementedError

    def _requests(self) -> Iterable[RequestT]:
        """Every request the worker knows: queued or running (called under the lock)."""
        raise NotImplementedError

    def cancel(self, seq: RequestT) -> None:
        """Mark cancelled; the worker drops it at its next step (or before it starts)."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for seq in list(self._requests()):
                seq.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

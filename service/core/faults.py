"""Fault injection for tests of the failures that heal (``CMAMBA_FAULT_INJECTION``).

Inert unless the setting is given. A plan names one fault and the served model call or
extraction job it hits (counted from 1 once the core is ready, so warm-up is not counted):

- ``cuda_error:N``: the Nth model call and every later one raise the ``RuntimeError`` a CUDA
  illegal memory access raises (a sticky error: the context stays broken);
- ``model_worker_exit:N``: the Nth model call ends the model worker thread;
- ``extraction_worker_exit:N``: the Nth extraction job ends its extraction thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal["cuda_error", "model_worker_exit", "extraction_worker_exit"]

FAULT_SPEC_PATTERN = r"^(cuda_error|model_worker_exit|extraction_worker_exit):[1-9][0-9]*$"
"""What ``CMAMBA_FAULT_INJECTION`` accepts."""

CUDA_ERROR_MESSAGE = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect."
)
"""The text of the RuntimeError torch raises after an illegal memory access."""


class InjectedWorkerExit(BaseException):
    """Ends the worker thread that raises it (a ``BaseException``, as no handler of ordinary
    errors on the way stops it)."""


@dataclass
class FaultPlan:
    """One injected fault: ``kind`` on the ``at``-th served call."""

    kind: FaultKind
    at: int
    _armed: bool = field(default=False, init=False)
    _calls: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def arm(self) -> None:
        """Start counting (the core is ready)."""
        self._armed = True

    def _hit(self) -> bool:
        with self._lock:
            if not self._armed:
                return False
            self._calls += 1
            sticky = self.kind == "cuda_error"
            return self._calls >= self.at if sticky else self._calls == self.at

    def before_forward(self, features: Mapping[str, Any], masks: Mapping[str, Any]) -> None:
        """The model runner's hook: raise the fault on its model call."""
        if self.kind == "extraction_worker_exit" or not self._hit():
            return
        if self.kind == "cuda_error":
            raise RuntimeError(CUDA_ERROR_MESSAGE)
        raise InjectedWorkerExit("injected: the model worker thread ends")

    def before_extraction(self) -> None:
        """The extraction pool's hook: end the thread on its job."""
        if self.kind == "extraction_worker_exit" and self._hit():
            raise InjectedWorkerExit("injected: the extraction thread ends")


def parse_fault(spec: str | None) -> FaultPlan | None:
    """The plan of a ``kind:N`` setting (None when unset)."""
    if not spec:
        return None
    kind, _, at = spec.partition(":")
    if kind not in ("cuda_error", "model_worker_exit", "extraction_worker_exit"):
        raise ValueError(f"unknown fault {kind!r}")
    return FaultPlan(kind=kind, at=int(at))  # type: ignore[arg-type]

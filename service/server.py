"""uvicorn with a graceful drain: on SIGTERM readiness turns 503 while in-flight requests
finish; only then does uvicorn stop listening and shut the app down."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from service.core.engine import InferenceCore
from service.core.lifecycle import CoreState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains the inference core before exiting.

    The first SIGTERM or SIGINT starts the drain: the listener stays open, so load balancers
    see readiness go 503 and new predictions get 503 ``draining``; once nothing is in flight
    (or ``drain_timeout_s`` passed) the usual uvicorn shutdown runs. A second signal forces it.
    A failed startup (the model could not load) stops the server with ``exit_code`` 1; a
    fatal failure (:mod:`service.core.health_state`) stops it with ``exit_code`` 3 once the
    core's ``fatal_exit_grace_s`` has passed.
    """

    FATAL_EXIT_CODE = 3

    def __init__(self, config: uvicorn.Config, core: InferenceCore, drain_timeout_s: float):
        super().__init__(config)
        self.core = core
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._drain_requested = False
        self._drain_started: float | None = None
        self._fatal_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self.should_exit:
            super().handle_exit(sig, frame)
            self.force_exit = self.force_exit or sig == signal.SIGINT
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        self.core.watch()
        fatal = self.core.health.fatal
        if fatal is not None and not self.should_exit:
            grace = self.core.settings.fatal_exit_grace_s
            if not self._fatal_logged:
                logger.error("fatal %s failure: exiting in %.1f s", fatal.kind, grace)
                self._fatal_logged = True
            if time.monotonic() - fatal.at >= grace:
                self.exit_code = self.FATAL_EXIT_CODE
                self.should_exit = True
        if self.core.state is CoreState.FAILED and not self.should_exit:
            logger.error("startup failed: %s", self.core.startup_error)
            self.exit_code = 1
            self.should_exit = True
        if self._drain_requested and self._drain_started is None:
            self.core.begin_drain()
            self._drain_started = time.monotonic()
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            idle = self.core.inflight == 0 and self.core.active_streams == 0
            if idle or waited >= self.drain_timeout_s:
                logger.info("drained in %.1f s (%d still in flight)", waited, self.core.inflight)
                self.should_exit = True
        return await super().on_tick(counter)

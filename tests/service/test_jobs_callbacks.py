"""Job callbacks: allow-listed targets only, signed bodies, retries with backoff, against a real
HTTP receiver on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import wait_until
from jobmedia import Receiver, audio_checkpoint, write_tone_wav

from service.errors import CallbackNotAllowedError
from service.jobs.callbacks import CallbackPolicy
from service.main import create_app
from service.settings import ServiceSettings

SECRET = "callback-secret"


@pytest.fixture
def receiver() -> Iterator[Callable[[int], Receiver]]:
    made: list[Receiver] = []

    def make(failures: int) -> Receiver:
        made.append(Receiver(failures))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def audio_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return audio_checkpoint(tmp_path_factory.mktemp("ckpt") / "audio")


@pytest.fixture(scope="module")
def short_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tone_wav(tmp_path_factory.mktemp("media") / "short.wav", 8.0)


def _client(
    start_client: Callable[..., TestClient], ckpt: Path, tmp_path: Path, **overrides: Any
) -> TestClient:
    from preprocessing import Extractor

    values: dict[str, Any] = {
        "model_path": ckpt,
        "jobs_dir": tmp_path / "jobs",
        "jobs_poll_s": 0.1,
        "torch_threads": 1,
        "jobs_callback_allow": ("127.0.0.1/32",),
        "jobs_callback_secret": SECRET,
        "jobs_callback_backoff_s": 0.2,
        "jobs_callback_attempts": 4,
    }
    values.update(overrides)
    extractor = Extractor(modalities=("audio",))
    return start_client(create_app(ServiceSettings(**values), extractor=extractor))


def _submit(client: TestClient, media: Path, callback_url: str) -> Any:
    with media.open("rb") as fh:
        return client.post(
            "/v1/jobs",
            params={"callback_url": callback_url},
            files={"file": (media.name, fh, "audio/wav")},
        )


@pytest.mark.slow
def test_a_callback_is_retried_with_backoff_and_signed(
    start_client: Callable[..., TestClient],
    audio_ckpt: Path,
    short_recording: Path,
    tmp_path: Path,
    receiver: Callable[[int], Receiver],
) -> None:
    target = receiver(2)  # fails twice, then takes it
    client = _client(start_client, audio_ckpt, tmp_path)
    answer = _submit(client, short_recording, target.url)
    assert answer.status_code == 202, answer.text
    location = answer.headers["location"]
    assert answer.json()["callback"] == {"url": target.url, "state": "pending"}

    status = wait_until(
        lambda: (s := client.get(location).json())["callback"]["state"] == "delivered" and s,
        "the callback to be delivered",
        120,
    )
    assert status["state"] == "succeeded"
    assert len(target.requests) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(target.requests, target.requests[1:], strict=False)]
    assert gaps[0] >= 0.2 * 0.9 and gaps[1] >= 0.4 * 0.9  # 0.2 s, then twice as long
    for request in target.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        timestamp = headers["x-cmamba-timestamp"]
        assert abs(int(timestamp) - time.time()) < 120
        expected = hmac.new(
            SECRET.encode(), timestamp.encode() + b"." + request["body"], hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(headers["x-cmamba-signature"], f"sha256={expected}")
        assert headers["content-type"] == "application/json"
    sent = json.loads(target.requests[-1]["body"])
    assert sent["id"] == answer.json()["id"] and sent["state"] == "succeeded"
    assert sent["result_url"] == f"{location}/result"
    # A body changed on the way no longer matches its signature.
    tampered = target.requests[-1]["body"].replace(b"succeeded", b"failed")
    forged = hmac.new(SECRET.encode(), timestamp.encode() + b"." + tampered, hashlib.sha256)
    assert f"sha256={forged.hexdigest()}" != headers["x-cmamba-signature"]


@pytest.mark.slow
def test_a_callback_that_never_succeeds_is_marked_failed(
    start_client: Callable[..., TestClient],
    audio_ckpt: Path,
    short_recording: Path,
    tmp_path: Path,
    receiver: Callable[[int], Receiver],
) -> None:
    target = receiver(100)
    client = _client(start_client, audio_ckpt, tmp_path, jobs_callback_attempts=3,
                     jobs_callback_backoff_s=0.05)  # fmt: skip
    location = _submit(client, short_recording, target.url).headers["location"]
    status = wait_until(
        lambda: (s := client.get(location).json())["callback"]["state"] == "failed" and s,
        "the callback to give up",
        120,
    )
    assert status["state"] == "succeeded" and len(target.requests) == 3


def test_callback_targets_must_be_allowed() -> None:
    nothing = CallbackPolicy(())
    with pytest.raises(CallbackNotAllowedError, match="sends no callbacks"):
        nothing.check("http://127.0.0.1:8080/hook")

    loopback = CallbackPolicy(["127.0.0.0/8"])
    assert loopback.check("http://127.0.0.1:8080/hook") == ("127.0.0.1", 8080)
    for refused in (
        "http://10.1.2.3/hook",  # private, not listed
        "http://[::1]:8080/hook",  # loopback of another family
        "http://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
        "ftp://127.0.0.1/hook",
        "http://user:pw@127.0.0.1/hook",
        "http://no-such-host.invalid/hook",
        "not a url",
        "http://127.0.0.1:99999/hook",
    ):
        with pytest.raises(CallbackNotAllowedError):
            loopback.check(refused)

    # A listed host name allows its public addresses only: a name that resolves to loopback
    # or a private address is refused unless that address is listed too.
    named = CallbackPolicy(["localhost", "hooks.example"])
    with pytest.raises(CallbackNotAllowedError, match="not an allowed"):
        named.check("http://localhost:8080/hook")
    assert named._allowed("hooks.example", ipaddress.ip_address("93.184.216.34"))
    assert not named._allowed("other.example", ipaddress.ip_address("93.184.216.34"))
    assert not named._allowed("hooks.example", ipaddress.ip_address("192.168.1.5"))
    assert not named._allowed("hooks.example", ipaddress.ip_address("::ffff:127.0.0.1"))

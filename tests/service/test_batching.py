"""Micro-batching through the service: answers do not depend on the batch; GPU OOM recovery."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient


def post_together(client: TestClient, bodies: list[dict[str, Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post("/v1/predict/features", json=b), bodies))


def sentiment_vector(body: dict[str, Any]) -> np.ndarray:
    sentiment = body["sentiment"]
    return np.array([sentiment["score"], *sentiment["probabilities"].values()])


@pytest.mark.parametrize(
    ("buckets", "other_lengths"),
    [((), [5, 9, 33, 47, 60, 12, 21]), ((16, 32, 64), [17, 18, 25, 29, 31, 32, 24])],
    ids=["pad-to-longest", "length-buckets"],
)
def test_answer_does_not_depend_on_the_batch(
    features_app: Callable[..., TestClient],
    payload: Callable[..., dict],
    buckets: tuple[int, ...],
    other_lengths: list[int],
) -> None:
    # Same checkpoint, two servers: one without batching, one that waits for a full batch of
    # 8 (a long delay: the batch flushes when the eighth clip arrives).
    single = features_app(max_batch_size=1, length_buckets=buckets)
    client = features_app(
        max_batch_size=8,
        max_batch_delay_ms=5000,
        adaptive_batch_delay=False,
        length_buckets=buckets,
    )
    clip = payload(20, seed=42)
    alone = single.post("/v1/predict/features", json=clip).json()
    assert alone["batch"]["size"] == 1

    others = [payload(n, seed=i) for i, n in enumerate(other_lengths)]
    answers = post_together(client, [*others[:4], clip, *others[4:]])
    assert all(a.status_code == 200 for a in answers)
    batched = answers[4].json()
    assert batched["batch"]["size"] == 8
    if buckets:
        assert alone["batch"]["padded_length"] == batched["batch"]["padded_length"] == 32
    else:
        assert alone["batch"]["padded_length"] == 20
        assert batched["batch"]["padded_length"] == 60
    np.testing.assert_allclose(sentiment_vector(batched), sentiment_vector(alone), atol=1e-5)
    # and the other clips do differ from it: the comparison is not vacuous
    assert not np.allclose(sentiment_vector(answers[0].json()), sentiment_vector(alone))


def test_clips_are_grouped_by_length_bucket(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    client = features_app(
        max_batch_size=4,
        max_batch_delay_ms=5000,
        adaptive_batch_delay=False,
        length_buckets=(16, 64),
    )
    answers = post_together(client, [payload(n, seed=n) for n in (10, 12, 40, 50)])
    batches = {a.json()["modalities"]["steps"]: a.json()["batch"] for a in answers}
    assert batches[10] == batches[12] == {"size": 2, "padded_length": 16}
    assert batches[40] == batches[50] == {"size": 2, "padded_length": 64}
    text = client.get("/metrics").text
    assert metric(text, "cmamba_batch_size_bucket", le="2.0") >= 2.0


def test_a_lone_request_does_not_wait_for_company(
    features_app: Callable[..., TestClient], payload: Callable[..., dict]
) -> None:
    adaptive = features_app(max_batch_size=8, max_batch_delay_ms=5000)
    answer = adaptive.post("/v1/predict/features", json=payload(12, 0)).json()
    assert answer["batch"]["size"] == 1
    assert answer["timings_ms"]["queue"] < 1000
    fixed = features_app(max_batch_size=8, max_batch_delay_ms=300, adaptive_batch_delay=False)
    answer = fixed.post("/v1/predict/features", json=payload(12, 0)).json()
    assert answer["timings_ms"]["queue"] >= 300


class OutOfMemoryAbove:
    """Raise CUDA OOM at the model call when a batch holds more than ``budget`` valid steps."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.calls: list[int] = []

    def __call__(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        valid = int(masks["text"].sum())
        self.calls.append(valid)
        if valid > self.budget:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def test_oom_batch_is_split_and_every_clip_answered(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    hook = OutOfMemoryAbove(budget=25)  # a batch of 4 x 10 steps does not fit; 2 x 10 does
    client = features_app(
        max_batch_size=4,
        max_batch_delay_ms=5000,
        adaptive_batch_delay=False,
        warmup=False,
        before_forward=hook,
    )
    answers = post_together(client, [payload(10, seed=i) for i in range(4)])
    assert [a.status_code for a in answers] == [200] * 4
    assert sorted(a.json()["batch"]["size"] for a in answers) == [2, 2, 2, 2]
    assert hook.calls == [40, 20, 20]
    text = client.get("/metrics").text
    assert metric(text, "cmamba_gpu_oom_total") == 1.0
    assert metric(text, "cmamba_rejected_requests_total", reason="gpu_oom") == 0.0


def test_oom_fails_only_the_clips_that_do_not_fit_alone(
    features_app: Callable[..., TestClient], payload: Callable[..., dict], metric: Callable
) -> None:
    hook = OutOfMemoryAbove(budget=30)  # a 40-step clip never fits; 10-step clips do
    client = features_app(
        max_batch_size=4,
        max_batch_delay_ms=5000,
        adaptive_batch_delay=False,
        length_buckets=(),
        warmup=False,
        before_forward=hook,
    )
    lengths = [10, 40, 10, 40]
    answers = post_together(client, [payload(n, seed=i) for i, n in enumerate(lengths)])
    for length, answer in zip(lengths, answers, strict=True):
        if length == 10:
            assert answer.status_code == 200, answer.text
        else:
            assert answer.status_code == 503
            assert answer.json()["error"]["type"] == "gpu_oom"
            assert "retry-after" in answer.headers
    text = client.get("/metrics").text
    assert metric(text, "cmamba_rejected_requests_total", reason="gpu_oom") == 2.0
    assert metric(text, "cmamba_gpu_oom_total") >= 3.0
    assert client.get("/v2/health/ready").status_code == 200

"""The one mapping of domain errors to HTTP statuses and headers (no app needed)."""

from __future__ import annotations

import pytest

from service import errors
from service.api.errors import error_headers, error_response, http_status


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidInputError("x"), 422),
        (errors.FeatureMismatchError("x"), 422),
        (errors.UndecodableMediaError("x"), 422),
        (errors.UnsupportedMediaError("x"), 415),
        (errors.PayloadTooLargeError("x"), 413),
        (errors.UnauthorizedError("x"), 401),
        (errors.ModelNotFoundError("x"), 404),
        (errors.MediaDisabledError("x"), 501),
        (errors.ClientDisconnectedError("x"), 499),
        (errors.NotReadyError("x"), 503),
        (errors.DrainingError("x"), 503),
        (errors.OverCapacityError("x", reason="queue_full"), 503),
        (errors.GpuOutOfMemoryError("x"), 503),
        (errors.DeadlineExceededError("x"), 504),
        (errors.ServiceError("x"), 500),
    ],
)
def test_each_domain_error_has_its_status(error: errors.ServiceError, status: int) -> None:
    assert http_status(error) == status
    response = error_response(error, retry_after_s=3)
    assert response.status_code == status
    assert response.body.startswith(b'{"error":{"type":"' + error.error_type.encode())
    if status == 503:
        assert response.headers["retry-after"] == "3"
    else:
        assert "retry-after" not in response.headers


def test_unauthorized_names_the_scheme() -> None:
    assert error_headers(errors.UnauthorizedError("x"), 1) == {"WWW-Authenticate": "Bearer"}

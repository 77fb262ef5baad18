"""Job callbacks: a signed POST to the client's URL once a job has ended, with retries.

Targets are restricted (``jobs_callback_allow``): a URL is taken only when every address its
host resolves to is allowed. An entry of the allow-list is an IP address, a CIDR, or a host
name; a host name allows public addresses only, while private, loopback, link-local and other
special addresses must be listed themselves (as an address or a CIDR). With an empty list no
callback is taken. The check runs when the job is submitted and again before each try (the
name may resolve elsewhere by then); redirects are not followed.

The body is JSON (the job's status, as ``GET /v1/jobs/{id}`` answers it). Headers:
``X-Cmamba-Timestamp`` (Unix seconds) and ``X-Cmamba-Signature: sha256=<hex>``, the
HMAC-SHA256 under ``jobs_callback_secret`` of ``<timestamp>.<body>`` (:func:`signature`): a
receiver recomputes it over the raw body and rejects old timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.errors import CallbackNotAllowedError

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Cmamba-Signature"
TIMESTAMP_HEADER = "X-Cmamba-Timestamp"
MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def _special(address: IPAddress) -> bool:
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)
    )


class CallbackPolicy:
    """The allow-list of callback targets (see the module's docstring)."""

    def __init__(self, allow: Sequence[str]) -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for entry in allow:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    @property
    def enabled(self) -> bool:
        return bool(self.networks or self.hosts)

    def check(self, url: str) -> tuple[str, int]:
        """Raise :class:`CallbackNotAllowedError` unless ``url`` is an allowed target; its
        host and port. Resolves the host name (blocking: call it off the event loop)."""
        if not self.enabled:
            raise CallbackNotAllowedError(
                "this server sends no callbacks (jobs_callback_allow is empty): poll the job"
            )
        if len(url) > MAX_URL_CHARS:
            raise CallbackNotAllowedError(f"the callback_url is over {MAX_URL_CHARS} characters")
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise CallbackNotAllowedError(f"the callback_url is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CallbackNotAllowedError("the callback_url must be an http or https URL")
        if parts.username or parts.password:
            raise CallbackNotAllowedError("the callback_url must not carry credentials")
        host = parts.hostname.lower().rstrip(".")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise CallbackNotAllowedError("the callback_url's host does not resolve") from None
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
        if not addresses:
            raise CallbackNotAllowedError("the callback_url's host does not resolve")
        for address in addresses:
            if not self._allowed(host, address):
                raise CallbackNotAllowedError(
                    f"the callback_url's host resolves to {address}, which is not an allowed "
                    "callback target (jobs_callback_allow)"
                )
        return host, port

    def _allowed(self, host: str, address: IPAddress) -> bool:
        if any(address in network for network in self.networks):
            return True
        return host in self.hosts and not _special(address)


class CallbackSender:
    """Delivers callbacks: ``jobs_callback_attempts`` tries, waiting ``backoff_s``, then twice
    as long each time, for a 2xx answer.

    Args:
        policy: the allow-list, checked again before each try.
        secret: the HMAC key (None: unsigned; the docs ask for one).
        attempts: tries in all.
        backoff_s: wait before the second try.
        timeout_s: limit of one try.
    """

    def __init__(
        self,
        policy: CallbackPolicy,
        secret: bytes | None,
        *,
        attempts: int,
        backoff_s: float,
        timeout_s: float,
    ) -> None:
        self.policy = policy
        self.secret = secret
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s

    def headers(self, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, timestamp, body)
        return headers

    async def deliver(self, url: str, body: bytes) -> bool:
        """POST ``body`` to ``url`` until a 2xx answer; whether it was delivered."""
        delay = self.backoff_s
        async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False) as client:
            for attempt in range(1, self.attempts + 1):
                try:
                    await asyncio.to_thread(self.policy.check, url)
                    answer = await client.post(url, content=body, headers=self.headers(body))
                    if 200 <= answer.status_code < 300:
                        return True
                    reason: Any = answer.status_code
                except CallbackNotAllowedError as exc:
                    logger.warning("callback to a target no longer allowed: %s", exc.message)
                    return False
                except httpx.HTTPError as exc:
                    reason = type(exc).__name__
                logger.info("callback try %d of %d failed (%s)", attempt, self.attempts, reason)
                if attempt < self.attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        return False

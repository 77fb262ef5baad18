"""Soak: minutes of mixed good and bad traffic against a real server, sampling its resources.

Starts ``cmamba serve`` (media on, the real extractor), measures the capacity of the traffic mix
with a short closed loop, then sends the mix open-loop at ``--load`` times that rate for
``--minutes``. The mix holds good features and media requests and hostile ones: features that
overflow the model, oversized error echoes, truncated and cut media, multipart bodies of many
parts, clients that disconnect mid-request and connections that never finish their headers.
Every ``--sample-s`` it records the server's RSS, threads, file descriptors and upload-folder
files, and the answers so far; it prints a Markdown table and, with ``--doc``, writes it into the
``soak`` section of docs/PERFORMANCE.md.

    python bench/soak.py --minutes 3 --doc
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, write_section
from bench.load import DEFAULT_CLIP, Server, features_body, resolve_checkpoint

DOC = DOCS / "PERFORMANCE.md"
SECTION = "soak"


@dataclass
class Sample:
    elapsed_s: float
    rss_mb: float
    threads: int
    fds: int
    upload_files: int
    answered: int
    server_errors: int


def _sample(pid: int, started: float, statuses: Counter[int]) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    folders = Path(tempfile.gettempdir()).glob(f"cmamba-uploads-{pid}-*")
    return Sample(
        elapsed_s=time.monotonic() - started,
        rss_mb=rss_kb / 1024,
        threads=len(os.listdir(f"/proc/{pid}/task")),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        upload_files=sum(1 for folder in folders for _ in folder.iterdir()),
        answered=sum(statuses.values()),
        server_errors=sum(n for code, n in statuses.items() if code >= 500 and code != 503),
    )


class Mix:
    """The requests of the mix, by name, each a callable that returns a status (0: none)."""

    def __init__(self, url: str, port: int, checkpoint: Path, clip: Path) -> None:
        self.url = url
        self.port = port
        good = features_body(checkpoint, 50)
        body = json.loads(good)
        overflow = json.loads(good)
        overflow["features"] = {m: [[1e20] * len(r) for r in rows]
                                for m, rows in body["features"].items()}  # fmt: skip
        echo = {**body, "profile": "x" * 1_000_000}
        media = clip.read_bytes()
        self.media = media
        many_parts = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n' * 60_000
        self.requests: dict[str, tuple[float, Callable[[], int]]] = {
            "features": (0.45, lambda: self._json(good)),
            "media": (0.10, lambda: self._media(media)),
            "overflow": (0.10, lambda: self._json(json.dumps(overflow).encode())),
            "echo": (0.05, lambda: self._json(json.dumps(echo).encode())),
            "truncated media": (0.10, lambda: self._media(media[: len(media) // 2])),
            "many parts": (0.05, lambda: self._raw(many_parts + b"--b--\r\n")),
            "disconnect": (0.10, self._disconnect),
            "no headers": (0.05, self._no_headers),
        }
        self.client = httpx.Client(timeout=120)

    def _json(self, body: bytes) -> int:
        answer = self.client.post(
            f"{self.url}/v1/predict/features",
            content=body,
            headers={"content-type": "application/json"},
        )
        return answer.status_code

    def _media(self, data: bytes) -> int:
        answer = self.client.post(
            f"{self.url}/v1/predict",
            files={"file": ("clip.mp4", data, "video/mp4")},
            data={"transcript": "I am not sure about this"},
        )
        return answer.status_code

    def _raw(self, body: bytes) -> int:
        answer = self.client.post(
            f"{self.url}/v1/predict",
            content=body,
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        return answer.status_code

    def _disconnect(self) -> int:
        # A whole upload, then the connection closed before the answer.
        files = {"file": ("clip.mp4", self.media, "video/mp4")}
        request = httpx.Request("POST", f"{self.url}/v1/predict", files=files)
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(request.read())}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(head + request.read())
        return 0

    def _no_headers(self) -> int:
        # Half a request line, never finished: the server's header timeout closes it.
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost")
        threading.Timer(60.0, sock.close).start()
        return 0

    def pick(self, rng: np.random.Generator) -> tuple[str, Callable[[], int]]:
        names = list(self.requests)
        weights = np.array([self.requests[n][0] for n in names])
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        return name, self.requests[name][1]


def capacity(mix: Mix, seconds: float, concurrency: int) -> float:
    """Requests per second of the mix in a closed loop (the soak's 100%)."""
    rng = np.random.default_rng(1)
    stop = time.monotonic() + seconds
    done = itertools.count()

    def worker() -> None:
        while time.monotonic() < stop:
            mix.pick(rng)[1]()
            next(done)

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    return (next(done)) / seconds


def soak(
    mix: Mix, pid: int, rate: float, minutes: float, sample_s: float
) -> tuple[list[Sample], Counter[int], Counter[str]]:
    rng = np.random.default_rng(19)
    statuses: Counter[int] = Counter()
    sent: Counter[str] = Counter()
    lock = threading.Lock()

    def run(call: Callable[[], int]) -> None:
        try:
            code = call()
        except httpx.HTTPError:
            code = -1
        with lock:
            statuses[code] += 1

    started = time.monotonic()
    samples = [_sample(pid, started, statuses)]
    next_sample = started + sample_s
    end = started + minutes * 60.0
    with ThreadPoolExecutor(64) as pool:
        at = started
        while at < end:
            at += rng.exponential(1.0 / rate)  # Poisson arrivals
            while (now := time.monotonic()) < at:
                if now >= next_sample:
                    samples.append(_sample(pid, started, statuses))
                    next_sample += sample_s
                time.sleep(min(0.01, at - now))
            name, call = mix.pick(rng)
            sent[name] += 1
            pool.submit(run, call)
    samples.append(_sample(pid, started, statuses))
    return samples, statuses, sent


def render(
    samples: list[Sample],
    statuses: Counter[int],
    sent: Counter[str],
    *,
    minutes: float,
    rate: float,
    full_rate: float,
    load: float,
    checkpoint_label: str,
) -> str:
    lines = [
        f"`python bench/soak.py --minutes {minutes:g} --load {load:g}`: {minutes:g} minutes of "
        f"mixed traffic at {rate:.2f} req/s, {load:.0%} of the mix's closed-loop capacity "
        f"({full_rate:.2f} req/s), against `cmamba serve` with media on, checkpoint "
        f"{checkpoint_label}; {os.cpu_count()} CPU cores.",
        "",
        "Sent: " + ", ".join(f"{name} {n}" for name, n in sent.most_common()) + ".",
        "Answers: "
        + ", ".join(f"{code} x{n}" for code, n in sorted(statuses.items()))
        + " (0: none awaited, the client left; -1: a client-side error).",
        "",
        "| elapsed (s) | RSS (MB) | threads | fds | upload files | answered | 5xx (not 503) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in samples:
        lines.append(
            f"| {s.elapsed_s:.0f} | {s.rss_mb:.0f} | {s.threads} | {s.fds} | {s.upload_files} "
            f"| {s.answered} | {s.server_errors} |"
        )
    first, last = samples[1] if len(samples) > 2 else samples[0], samples[-1]
    lines += [
        "",
        f"From the first sample under load to the last: RSS {last.rss_mb - first.rss_mb:+.0f} MB, "
        f"threads {last.threads - first.threads:+d}, file descriptors {last.fds - first.fds:+d}, "
        f"upload files {last.upload_files}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="soak duration")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of capacity")
    parser.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--capacity-s", type=float, default=20.0, help="capacity run length")
    parser.add_argument("--checkpoint", type=Path, help="default: the embedded default")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="good media clip")
    parser.add_argument("--doc", action="store_true", help="write docs/PERFORMANCE.md's section")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        checkpoint, label = resolve_checkpoint(args.checkpoint, Path(workdir))
        server = Server(checkpoint, {"CMAMBA_HEADER_TIMEOUT_S": "5"}, [])
        try:
            server.wait_ready()
            mix = Mix(server.url, server.port, checkpoint, args.clip)
            full_rate = capacity(mix, args.capacity_s, concurrency=4)
            rate = max(0.1, args.load * full_rate)
            print(f"capacity {full_rate:.2f} req/s; soaking at {rate:.2f} req/s")
            samples, statuses, sent = soak(mix, server.proc.pid, rate, args.minutes, args.sample_s)
        finally:
            server.stop()
    text = render(
        samples,
        statuses,
        sent,
        minutes=args.minutes,
        rate=rate,
        full_rate=full_rate,
        load=args.load,
        checkpoint_label=label,
    )
    print(text)
    if args.doc:
        write_section(DOC, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

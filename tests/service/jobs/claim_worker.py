"""A runner process for tests of the job store across processes: it claims jobs from the store
at a URL and reports each on stdout. Not a test module; test_concurrency.py starts it.

    python claim_worker.py URL OWNER LEASE_S drain   claim and finish jobs until none is queued
    python claim_worker.py URL OWNER LEASE_S hold    claim one job and hold it, never renewing
    python claim_worker.py URL OWNER LEASE_S poll N  claim until N jobs are done, polling

Each prints "ready" once its store is open, then waits for a line on stdin before claiming, so
the test starts the claim loops together. A report line: "claimed <id> <claim time> <attempts>
<lease expiry>" (times ISO 8601, the worker's clock).
"""

from __future__ import annotations

import sys
import time

from service.jobs.store import JobRecord, JobState, open_store


def report(job: JobRecord) -> None:
    assert job.lease_expires_at is not None
    print(
        f"claimed {job.id} {job.updated_at.isoformat()} {job.attempts} "
        f"{job.lease_expires_at.isoformat()}",
        flush=True,
    )


def main() -> None:
    url, owner, lease, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    store = open_store(url)
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "drain":
        while True:
            job = store.claim(owner, lease)
            if job is None:
                if store.count(JobState.QUEUED) == 0:
                    break
                continue
            report(job)
            time.sleep(0.002)  # the work: it leaves the database to the other runners meanwhile
            assert store.add_segment(job.id, owner, 0, {"owner": owner})
            assert store.finish(job.id, owner, JobState.SUCCEEDED)
    elif mode == "hold":
        while (job := store.claim(owner, lease)) is None:
            time.sleep(0.01)
        report(job)
        sys.stdin.readline()  # until killed
    elif mode == "poll":
        left = int(sys.argv[5])
        while left:
            job = store.claim(owner, lease)
            if job is None:
                time.sleep(0.01)
                continue
            report(job)
            assert store.finish(job.id, owner, JobState.SUCCEEDED)
            left -= 1
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()

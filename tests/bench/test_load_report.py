"""bench/load.py's bookkeeping: pooled cells, the per-thread CPU columns and the doc sections."""

from __future__ import annotations

import math

from bench.load import Cell, merge, render, section_name


def cell(requests: int, server_cpu_s: float | None, loop_cpu_s: float | None) -> Cell:
    return Cell(
        endpoint="/v1/predict/features",
        batching="on",
        concurrency=32,
        requests=requests,
        refused=0,
        seconds=2.0,
        latencies_ms=[10.0] * requests,
        batch_sizes=[16] * requests,
        stage_ms={},
        timings=[],
        load=0.5,
        server_cpu_s=server_cpu_s,
        loop_cpu_s=loop_cpu_s,
    )


def test_merged_runs_add_up_cpu_and_requests() -> None:
    pooled = merge([cell(100, 0.5, 0.2), cell(300, 1.5, 0.4)])
    assert pooled.requests == 400
    assert math.isclose(pooled.server_cpu_ms, 2000.0 / 400)
    assert math.isclose(pooled.loop_cpu_ms, 600.0 / 400)
    # One run without /proc figures makes the pooled figure unknown, not a partial sum.
    unknown = merge([cell(100, 0.5, 0.2), cell(300, None, None)])
    assert math.isnan(unknown.server_cpu_ms) and math.isnan(unknown.loop_cpu_ms)


def test_report_has_the_event_loop_column_and_names_the_device() -> None:
    context = {
        "machine": "m",
        "checkpoint": "c",
        "device": "cuda",
        "scan_backend": "triton",
        "torch_threads": "1",
        "length": "50",
        "body_kb": "157",
        "duration": "3",
        "padded": "64",
        "batch_size": "16",
        "repeats": "2",
        "load": "0.1",
    }
    text = render([cell(100, 0.5, 0.2)], context, {}, ["verdict."])
    assert text.startswith("### Load on a GPU")
    header = next(line for line in text.splitlines() if line.startswith("| endpoint"))
    row = next(line for line in text.splitlines() if line.startswith("| `/v1"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = [v.strip() for v in row.strip("|").split("|")]
    assert len(columns) == len(values)
    assert values[columns.index("event loop CPU ms/req")] == "2.00"
    assert values[columns.index("server CPU ms/req")] == "5.00"
    cpu_text = render([cell(100, 0.5, 0.2)], {**context, "device": "cpu"}, {}, ["verdict."])
    assert cpu_text.startswith("### Load (")


def test_cpu_and_cuda_runs_write_their_own_sections() -> None:
    assert section_name("cpu") == "load"
    assert section_name("cuda") == section_name("cuda:0") == "load-cuda"

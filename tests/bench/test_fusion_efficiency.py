"""The fusion benchmark's measurement helpers on tiny sizes, and a --quick run end to end."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import fusion_efficiency as fe
from bench import fusion_measure as measure
from bench import fusion_report as report
from model import CoupledMambaConfig
from model.mamba import CoupledMambaLayer, MambaMixer

CPU = torch.device("cpu")
MiB = 2**20


def test_cpu_peak_follows_allocations_and_frees() -> None:
    def work() -> torch.Tensor:
        x = torch.ones(MiB)  # 4 MiB
        y = torch.ones(MiB // 2)  # 2 MiB -> 6 MiB live
        del x
        z = torch.ones(MiB // 4)  # 1 MiB -> 3 MiB live
        return y[:1] + z[:1]

    peak = measure.peak_memory_call(work, CPU)
    assert 6 * MiB <= peak < 6 * MiB + 64 * 1024


def test_cpu_peak_ignores_what_was_live_before() -> None:
    big = torch.ones(4 * MiB)
    peak = measure.peak_memory_call(lambda: big[: MiB // 4].clone(), CPU)
    assert MiB <= peak < MiB + 64 * 1024


def _allocate_big() -> torch.Tensor:
    return torch.ones(MiB)  # 4 MiB


def _allocate_small() -> torch.Tensor:
    return torch.ones(MiB // 4)  # 1 MiB


def test_peak_breakdown_names_the_allocating_lines() -> None:
    def work() -> tuple[torch.Tensor, torch.Tensor]:
        big = _allocate_big()
        small = _allocate_small()
        return big, small

    rows = measure.peak_breakdown_cpu(work)
    assert len(rows) == 2
    (first, first_bytes), (second, second_bytes) = rows
    assert first.endswith("_allocate_big") and first_bytes == 4 * MiB
    assert second.endswith("_allocate_small") and second_bytes == MiB


def test_real_cpu_allocation_failure_counts_as_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert measure.is_out_of_memory(info.value)
    assert measure.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not measure.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not measure.is_out_of_memory(ValueError("out of memory"))


def test_rounds_interleave_with_a_rotating_start() -> None:
    order: list[str] = []
    calls: dict[str, Callable[[], float]] = {
        name: functools.partial(lambda n: float(len(n)), name) for name in ("ours", "(a)", "(b)")
    }
    times = measure.interleaved_rounds(calls, 3, log=order)
    assert order == ["ours", "(a)", "(b)", "(a)", "(b)", "ours", "(b)", "ours", "(a)"]
    assert times == {"ours": [4.0] * 3, "(a)": [3.0] * 3, "(b)": [3.0] * 3}


def test_time_call_measures_the_call() -> None:
    seconds = measure.time_call(lambda: sum(range(200_000)), CPU)
    assert 0 < seconds < 5


def test_fit_line() -> None:
    slope, intercept, r2 = measure.fit_line([64, 256, 1024], [100 + 3 * x for x in (64, 256, 1024)])
    assert slope == pytest.approx(3.0)
    assert intercept == pytest.approx(100.0)
    assert r2 == pytest.approx(1.0)
    assert measure.fit_line([1, 2, 3], [1, 5, 2])[2] < 0.5
    with pytest.raises(ValueError):
        measure.fit_line([1], [1])


def test_layer_floor_counts_the_tensors_a_layer_holds_at_its_scan() -> None:
    config = CoupledMambaConfig(d_model=16, d_state=4, n_layers=1, dropout=0.0)
    layer = CoupledMambaLayer(config).eval()
    batch, length = 2, 12
    hidden = torch.randn(config.n_modalities, batch, length, config.d_model)
    total = hidden.numel()
    with torch.inference_mode():
        for i, m in enumerate(config.modalities):
            mixer = layer.mixers[m]
            assert isinstance(mixer, MambaMixer)
            u, dt, B, C, z, _ = mixer.scan_inputs(hidden[i], torch.ones(batch, length))
            y = torch.empty_like(u)  # the scan output has u's shape
            total += sum(t.numel() for t in (u, dt, B, C, z, y))
    floor = measure.layer_activation_floor(config)
    assert floor["floor"] * batch * length == total * 4


def _quick_options(**overrides: object) -> measure.BenchOptions:
    values: dict[str, object] = {
        "lengths": (8, 16),
        "batches": (1,),
        "repeats": 2,
        "quick": True,
        "mem_cap_gb": 4.0,
    }
    values.update(overrides)
    return measure.BenchOptions(**values)  # type: ignore[arg-type]


def test_a_setting_over_the_memory_cap_is_recorded_not_run() -> None:
    options = _quick_options()
    config = measure.bench_config(quick=True)
    models = measure.build_models(config, CPU, options.heads, "auto", 0)
    # (a) needs 2 x 1 x 4 x 64^2 x 4 B = 131 kB of attention matrices at L = 64.
    options.mem_cap_gb = 100e3 / 1e9
    done: dict[str, list[measure.Measurement]] = {}
    row = measure.run_setting(models, config, options, 1, 64, done, log=lambda _: None)
    assert row["(a)"].status == "oom" and row["(a)"].note == "OOM (est. 0.0 GB)"
    assert row["(a)"].times_s == [] and row["(a)"].peak_bytes is None
    for name in ("ours", "(b)"):
        assert row[name].status == "ok"
        assert len(row[name].times_s) == options.repeats
        peak = row[name].peak_bytes
        assert peak is not None and peak > 0
    # a larger setting is estimated from this one, and skipped when over the time cap
    options.mem_cap_gb, options.max_call_s = 4.0, 1e-9
    later = measure.run_setting(models, config, options, 1, 128, done, log=lambda _: None)
    assert later["ours"].status == "skipped" and later["ours"].note.startswith("skipped (est.")


class _RunsOutOfMemory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, features: object, masks: object) -> None:
        torch.empty(1 << 50, dtype=torch.uint8)  # a real allocation failure


def test_a_real_out_of_memory_is_recorded_not_raised() -> None:
    options = _quick_options()
    config = measure.bench_config(quick=True)
    models = measure.build_models(config, CPU, options.heads, "auto", 0)
    models["(b)"] = _RunsOutOfMemory()
    row = measure.run_setting(models, config, options, 1, 8, {}, log=lambda _: None)
    assert row["(b)"].status == "oom" and row["(b)"].note == "OOM"
    assert row["ours"].status == "ok" and row["(a)"].status == "ok"


def test_verdicts_say_met_and_missed() -> None:
    def row(ours: tuple[float, int], a: tuple[float, int], b: tuple[float, int]) -> dict:
        out = {}
        for name, (seconds, peak) in zip(measure.MODEL_NAMES, (ours, a, b), strict=True):
            out[name] = measure.Measurement(name, 1, 4096, times_s=[seconds], peak_bytes=peak)
        return out

    good = report.target_verdicts([row((1.0, 5), (3.0, 100), (2.0, 5))], 4096)[0]
    assert "speed vs (a) 3.00x (target >= 2x: met)" in good
    assert "memory vs (a) 95.0% less (target >= 90%: met)" in good
    assert "speed vs (b) 2.00x (target > 1x: met)" in good
    assert "memory vs (b) 1.00x of (b) (target <= 1x: met)" in good
    bad = report.target_verdicts([row((1.0, 50), (1.5, 100), (0.5, 10))], 4096)[0]
    assert bad.count("MISSED") == 4
    assert report.target_verdicts([row((1.0, 5), (3.0, 100), (2.0, 5))], 1024) == []

    config = measure.bench_config(quick=True)
    assert report.explain_misses([row((1.0, 5), (3.0, 100), (2.0, 5))], config, heads=4) == []
    why = report.explain_misses([row((1.0, 50), (1.5, 100), (0.5, 10))], config, heads=4)
    assert [line.split(":")[0] for line in why] == [
        "b=1, L=4096, memory vs (a)",
        "b=1, L=4096, memory vs (b)",
        "b=1, L=4096, speed vs (a)",
        "b=1, L=4096, speed vs (b)",
    ]
    assert "is 5.00x the 0.0 MiB allowed" in why[0]  # 50 B against 10% of 100 B
    assert "ours peaks 5.00x (b)" in why[1]


def test_doc_section_keeps_everything_else(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(
        "# Performance\n\n<!-- scan:begin -->\nscan table\n<!-- scan:end -->\n\n"
        f"{report.DOC_BEGIN}\n{report.DOC_END}\n\ntail\n"
    )
    report.write_doc_section(doc, "cuda", "cuda numbers\n")
    report.write_doc_section(doc, "cpu", "cpu numbers v1\n")
    report.write_doc_section(doc, "cpu", "cpu numbers v2\n")
    text = doc.read_text()
    assert "scan table" in text and text.endswith("tail\n")
    assert "cuda numbers" in text and "cpu numbers v2" in text and "v1" not in text
    assert text.count(report.DOC_BEGIN) == 1 and text.count("<!-- fusion-cpu:begin -->") == 1
    section = text.split(report.DOC_BEGIN)[1].split(report.DOC_END)[0]
    assert "cpu numbers v2" in section and "scan table" not in section


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"# Performance\n\n{report.DOC_BEGIN}\n{report.DOC_END}\n")
    out = tmp_path / "fusion.json"
    argv = ["--quick", "--lengths", "8,16,32", "--batches", "1", "--repeats", "2"]
    assert fe.main([*argv, "--doc", str(doc), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speed-up (a)" in printed and "memory slope of ours at batch 1" in printed
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["ours"]["length"] for r in rows] == [8, 16, 32]
    for r in rows:
        for name in measure.MODEL_NAMES:
            assert r[name]["status"] == "ok"
            assert len(r[name]["times_s"]) == 2 and r[name]["median_s"] > 0
            assert r[name]["peak_bytes"] > 0
    text = doc.read_text()
    assert "| 1 | 32 | 2 |" in text and "memory of ours against L" in text
    assert "<!-- fusion-cpu:begin -->" in text
    assert "Bytes alive at the memory peak (batch 1, L = 32)" in text

    # the saved results render the same section again, without measuring
    doc.write_text(f"# Performance\n\n{report.DOC_BEGIN}\n{report.DOC_END}\n")
    assert fe.main(["--render-json", str(out), "--doc", str(doc)]) == 0
    assert doc.read_text() == text


def test_rounds_per_setting() -> None:
    options = _quick_options(repeats=3, long_round_s=60.0)
    assert measure.timed_rounds(options, n_active=3, round_estimate_s=10.0) == 3
    assert measure.timed_rounds(options, n_active=3, round_estimate_s=61.0) == 2
    assert measure.timed_rounds(options, n_active=1, round_estimate_s=1.0) == 1


def test_crossovers() -> None:
    def row(length: int, ours: float, a: float, b: float | None) -> dict[str, measure.Measurement]:
        out = {}
        for name, seconds in zip(measure.MODEL_NAMES, (ours, a, b), strict=True):
            times = [seconds] if seconds is not None else []
            out[name] = measure.Measurement(name, 1, length, times_s=times)
        return out

    table = [row(64, 2.0, 1.0, 1.0), row(256, 2.0, 3.0, 1.0), row(1024, 2.0, 9.0, None)]
    assert report.crossovers(table) == [
        "batch 1: ours is faster than (a) from L = 256",
        "batch 1: ours is faster than (b) at no measured L (up to 256)",
    ]

"""Measuring for ``bench/fusion_efficiency.py``: latency and peak memory of our model and the
two cross-attention baselines per (batch, L), the memory breakdown, and one ``/v1/predict``.

The method is described in ``bench/fusion_efficiency.py``; the analysis and the doc section are in
``bench/fusion_report.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.baselines import CrossAttentionFusion, attention_matrix_bytes
from bench.doc_sections import ROOT, SHARED
from model import CoupledMambaConfig, CoupledMambaForSentiment

MODEL_NAMES = ("ours", "(a)", "(b)")
FULL_LENGTHS = (64, 256, 1024, 4096, 16384)
FULL_BATCHES = (1, 16)
QUICK_LENGTHS = (16, 32, 64)
QUICK_BATCHES = (1, 2)
TARGET_LENGTH = 4096
DEFAULT_CLIP = "media/cremad_1001_DFA_HAP_XX.mp4"  # relative to the shared folder


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class _Allocation:
    time_ns: int
    size: int  # negative for a free
    total: int  # the allocator's running total after this event
    ptr: int
    source: str  # innermost project frame (file(line): function) when attributed, else ""


def _allocation_events(prof: torch.profiler.profile, device_type: str) -> list[_Allocation]:
    """Allocation and free events of ``device_type`` in time order, each attributed to the
    innermost Python frame outside torch that was running (when the profile has stacks)."""
    from torch._C._profiler import _EventType

    events: list[_Allocation] = []
    tree = prof.profiler.kineto_results.experimental_event_tree()  # type: ignore[union-attr]
    stack: list[tuple[Any, str]] = [(node, "") for node in tree]
    while stack:
        node, source = stack.pop()
        if node.tag == _EventType.PyCall:
            name = str(node.name)
            if not name.startswith(("torch/", "<built-in", "nn.Module")) and (
                "site-packages" not in name
            ):
                source = name
        if node.tag == _EventType.Allocation:
            extra = node.extra_fields
            if extra.device.type == device_type:
                events.append(
                    _Allocation(
                        node.start_time_ns,
                        extra.alloc_size,
                        extra.total_allocated,
                        extra.ptr,
                        source,
                    )
                )
        stack.extend((child, source) for child in node.children)
    events.sort(key=lambda e: e.time_ns)
    return events


def _peak_index(events: Sequence[_Allocation]) -> tuple[int, int]:
    """(index of the event at the peak, peak bytes above the total before the first event)."""
    base = events[0].total - events[0].size  # the allocator's total just before the first event
    index = max(range(len(events)), key=lambda i: events[i].total)
    return index, max(0, events[index].total - base)


def _cpu_allocation_peak(prof: torch.profiler.profile) -> int:
    """Highest running total of PyTorch CPU allocations in a profile, relative to its start."""
    events = _allocation_events(prof, "cpu")
    return _peak_index(events)[1] if events else 0


def peak_breakdown_cpu(fn: Callable[[], object]) -> list[tuple[str, int]]:
    """Run ``fn`` once on CPU; return the bytes alive at its memory peak, grouped by the
    innermost non-torch Python frame that allocated them, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        fn()
    events = _allocation_events(prof, "cpu")
    if not events:
        return []
    index, _ = _peak_index(events)
    live: dict[int, _Allocation] = {}
    for event in events[: index + 1]:
        if event.size > 0:
            live[event.ptr] = event
        else:
            live.pop(event.ptr, None)
    groups: dict[str, int] = {}
    for event in live.values():
        source = event.source or "(no Python frame)"
        groups[source] = groups.get(source, 0) + event.size
    return sorted(groups.items(), key=lambda item: -item[1])


def peak_memory_call(fn: Callable[[], object], device: torch.device) -> int:
    """Run ``fn`` once; return the peak bytes it allocated above what was live at its start.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: PyTorch's CPU allocator as
    seen by ``torch.profiler`` with ``profile_memory=True`` (the call runs slower under it).
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _cpu_allocation_peak(prof)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocation failure (CUDA OOM or the CPU allocator's)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def interleaved_rounds(
    calls: dict[str, Callable[[], float]], rounds: int, log: list[str] | None = None
) -> dict[str, list[float]]:
    """Call every entry of ``calls`` once per round, starting one later each round.

    Each callable returns the seconds it measured. ``log`` (if given) receives the names in
    call order. Returns the list of seconds per name.
    """
    names = list(calls)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if log is not None:
                log.append(name)
            out[name].append(calls[name]())
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept``; returns (slope, intercept, r_squared)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("need at least two (x, y) pairs of equal count")
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x are equal")
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return slope, intercept, r2


def layer_activation_floor(config: CoupledMambaConfig, element_size: int = 4) -> dict[str, int]:
    """Bytes per time step and sample that a coupled layer must hold at once, and references.

    A layer run on the whole sequence at once (training; inference up to
    ``inference_chunk_size`` steps) makes one scan call over all M modalities
    (the ``coupled_selective_scan`` contract), so at the scan, for every step, it must hold:
    the layer input (kept for the residual, d per modality), the scan inputs u, dt, z (D each)
    and B, C (N each), and the scan output y (D): ``M * (d + 4 D + 2 N)`` values. Everything
    else the code keeps alive (the in_proj output, conv and x_proj outputs while they are
    stacked, time-major copies inside the scan, the gate) is overhead above this floor.

    Returns:
        ``floor``: that minimum; ``stream``: the residual stream in and out (2 M d), what a
        layer run in chunks of time (carrying conv and scan state) needs per step, for one
        chunk;
        ``state_per_step``: one (D, N) state per modality, what materialising
        (batch, D, N, L) tensors would cost per step for each such tensor.
    """
    M, d, D, N = config.n_modalities, config.d_model, config.d_inner, config.d_state
    return {
        "floor": M * (d + 4 * D + 2 * N) * element_size,
        "stream": 2 * M * d * element_size,
        "state_per_step": M * D * N * element_size,
    }


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One model at one setting. ``status``: "ok", "oom" or "skipped" (``note`` says why)."""

    model: str
    batch: int
    length: int
    status: str = "ok"
    note: str = ""
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


@dataclass
class BenchOptions:
    """Settings of one benchmark run (see ``--help``)."""

    device: str = "cpu"
    lengths: tuple[int, ...] = FULL_LENGTHS
    batches: tuple[int, ...] = FULL_BATCHES
    repeats: int = 3
    threads: int = 1
    heads: int = 4
    mem_cap_gb: float = 4.0
    max_call_s: float = 30.0
    long_round_s: float = 60.0
    scan_backend: str = "auto"
    quick: bool = False
    seed: int = 0


def bench_config(quick: bool) -> CoupledMambaConfig:
    """The paper's defaults (d_model 128, d_state 64, 3 layers, 3 modalities), or a tiny one."""
    if quick:
        return CoupledMambaConfig(d_model=16, d_state=4, n_layers=1, dropout=0.0)
    return CoupledMambaConfig(dropout=0.0)


def build_models(
    config: CoupledMambaConfig, device: torch.device, heads: int, scan_backend: str, seed: int
) -> dict[str, torch.nn.Module]:
    """Our model and the two baselines ((b) shares (a)'s weights), eval mode, on ``device``."""
    torch.manual_seed(seed)
    ours = CoupledMambaForSentiment(config, scan_backend="ref").to(device).eval()
    ours.set_scan_backend(scan_backend)
    materialized = CrossAttentionFusion.from_config(config, "materialized", heads)
    fused = CrossAttentionFusion.from_config(config, "sdpa", heads)
    fused.load_state_dict(materialized.state_dict())
    return {
        "ours": ours,
        "(a)": materialized.to(device).eval(),
        "(b)": fused.to(device).eval(),
    }


def make_inputs(
    config: CoupledMambaConfig, batch: int, length: int, device: torch.device, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random features (b, L, F_m) and all-valid masks for every modality of ``config``."""
    generator = torch.Generator().manual_seed(seed)
    features = {
        m: torch.randn(batch, length, config.feature_dims[m], generator=generator).to(device)
        for m in config.modalities
    }
    masks = {m: torch.ones(batch, length, dtype=torch.bool, device=device) for m in features}
    return features, masks


def _estimate(
    name: str,
    batch: int,
    length: int,
    heads: int,
    done: dict[str, list[Measurement]],
) -> tuple[float | None, float | None]:
    """(estimated peak bytes, estimated seconds) of ``name`` at a setting from the closest
    smaller measured setting; None where there is nothing to scale from."""
    previous = [m for m in done.get(name, []) if m.status == "ok" and m.length <= length]
    previous = [m for m in previous if m.batch <= batch]
    mem: float | None = None
    if name == "(a)":
        mem = float(attention_matrix_bytes(batch, length, heads))
    if not previous:
        return mem, None
    ref = max(previous, key=lambda m: (m.batch * m.length, m.length))
    scale_l = length / ref.length
    scale_b = batch / ref.batch
    exponent = 1.0 if name == "ours" else 2.0  # attention is quadratic in L
    if mem is None and ref.peak_bytes is not None:
        mem = ref.peak_bytes * scale_l * scale_b
    seconds = None
    if ref.median_s is not None:
        seconds = ref.median_s * scale_b * scale_l**exponent
    return mem, seconds


def run_setting(
    models: dict[str, torch.nn.Module],
    config: CoupledMambaConfig,
    options: BenchOptions,
    batch: int,
    length: int,
    done: dict[str, list[Measurement]],
    log: Callable[[str], None] = print,
) -> dict[str, Measurement]:
    """Measure every model at one (batch, L): memory call, then interleaved timed rounds."""
    device = torch.device(options.device)
    features, masks = make_inputs(config, batch, length, device, options.seed)
    results: dict[str, Measurement] = {}
    active: dict[str, Callable[[], object]] = {}
    cap = options.mem_cap_gb * 1e9
    round_estimate = 0.0  # seconds, summed over the models that will run
    for name, net in models.items():
        result = Measurement(name, batch, length)
        results[name] = result
        est_mem, est_s = _estimate(name, batch, length, options.heads, done)
        round_estimate += est_s or 0.0
        if est_mem is not None and est_mem > cap:
            result.status, result.note = "oom", f"OOM (est. {est_mem / 1e9:.1f} GB)"
            continue
        if est_s is not None and est_s > options.max_call_s:
            result.status, result.note = "skipped", f"skipped (est. {est_s:.0f} s)"
            continue
        earlier = done.get(name, [])
        if any(m.status != "ok" and m.batch <= batch and m.length <= length for m in earlier):
            result.status, result.note = "skipped", "skipped (a smaller setting did not run)"
            continue

        def call(net: torch.nn.Module = net) -> object:
            with torch.inference_mode():
                return net(features, masks)

        try:
            if device.type == "cuda":
                call()  # kernel compilation and library workspaces are not the model's memory
            result.peak_bytes = peak_memory_call(call, device)
        except Exception as error:  # an OOM is a result, anything else a bug
            if not is_out_of_memory(error):
                raise
            result.status, result.note = "oom", "OOM"
            _free(device)
            continue
        active[name] = call

    def timed(name: str) -> Callable[[], float]:
        return lambda: time_call(active[name], device)

    rounds = timed_rounds(options, len(active), round_estimate)
    if active:
        try:
            times = interleaved_rounds({n: timed(n) for n in active}, rounds)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            for name in active:
                results[name].status, results[name].note = "oom", "OOM while timing"
            _free(device)
        else:
            for name, seconds in times.items():
                results[name].times_s = seconds
    for result in results.values():
        done.setdefault(result.model, []).append(result)
    log(format_setting_line(results))
    return results


def timed_rounds(options: BenchOptions, n_active: int, round_estimate_s: float) -> int:
    """Rounds for a setting: ``repeats``; 1 when a model runs alone (nothing to compare
    with); at most 2 when one round is estimated over ``long_round_s`` (keeps the CPU run
    near 10 minutes)."""
    if n_active <= 1:
        return 1
    if round_estimate_s > options.long_round_s:
        return min(options.repeats, 2)
    return options.repeats


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt_ms(m: Measurement) -> str:
    return f"{m.median_s * 1e3:,.1f}" if m.median_s is not None else m.note


def fmt_mb(m: Measurement) -> str:
    return f"{m.peak_bytes / 2**20:,.1f}" if m.peak_bytes is not None else m.note


def fmt_x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def fmt_saved(ours: Measurement, other: Measurement) -> str:
    r = ratio(ours.peak_bytes, other.peak_bytes)
    return f"{(1 - r) * 100:.1f}%" if r is not None else "-"


def format_setting_line(results: dict[str, Measurement]) -> str:
    """One console line per setting: medians, peaks and ratios."""
    ours = results["ours"]
    parts = [f"b={ours.batch:<3d} L={ours.length:<6d}"]
    for name in MODEL_NAMES:
        m = results[name]
        parts.append(f"{name} {fmt_ms(m)} ms / {fmt_mb(m)} MiB")
    parts.append(f"speed-up (a) {fmt_x(ratio(results['(a)'].median_s, ours.median_s))}")
    parts.append(f"(b) {fmt_x(ratio(results['(b)'].median_s, ours.median_s))}")
    parts.append(f"mem saved vs (a) {fmt_saved(ours, results['(a)'])}")
    parts.append(f"vs (b) {fmt_saved(ours, results['(b)'])}")
    return " | ".join(parts)


def run_benchmark(
    options: BenchOptions, log: Callable[[str], None] = print
) -> tuple[CoupledMambaConfig, dict[str, torch.nn.Module], list[dict[str, Measurement]]]:
    """Run every setting (batches outer, lengths ascending) and return the measurements."""
    torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    config = bench_config(options.quick)
    models = build_models(config, device, options.heads, options.scan_backend, options.seed)
    done: dict[str, list[Measurement]] = {}
    table: list[dict[str, Measurement]] = []
    for batch in options.batches:
        for length in sorted(options.lengths):
            table.append(run_setting(models, config, options, batch, length, done, log))
    return config, models, table


def breakdown_setting(table: Sequence[dict[str, Measurement]]) -> tuple[int, int] | None:
    """(batch, L) to itemise memory at: the smallest batch and the largest L up to the target
    length where ours and (b) both ran."""
    rows = [
        row
        for row in table
        if row["ours"].peak_bytes is not None
        and row["(b)"].peak_bytes is not None
        and row["ours"].length <= TARGET_LENGTH
    ]
    if not rows:
        return None
    batch = min(row["ours"].batch for row in rows)
    length = max(row["ours"].length for row in rows if row["ours"].batch == batch)
    return batch, length


def run_breakdowns(
    models: dict[str, torch.nn.Module],
    config: CoupledMambaConfig,
    options: BenchOptions,
    setting: tuple[int, int],
) -> dict[str, list[tuple[str, int]]]:
    """Live bytes at the memory peak by source line, for ours and (b), on CPU."""
    batch, length = setting
    features, masks = make_inputs(config, batch, length, torch.device("cpu"), options.seed)
    out: dict[str, list[tuple[str, int]]] = {}
    for name in ("ours", "(b)"):
        net = models[name]

        def call(net: torch.nn.Module = net) -> object:
            with torch.inference_mode():
                return net(features, masks)

        out[name] = peak_breakdown_cpu(call)
    return out


def machine_summary(options: BenchOptions, scan_backend: str) -> dict[str, Any]:
    """Where and how the run happened."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": options.threads,
        "device": options.device,
        "scan_backend": scan_backend,
        "commit": commit,
    }
    if options.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(options.device))
        summary["gpu"] = props.name
        summary["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    return summary


# ---------------------------------------------------------------------------------------------
# One /v1/predict, by stage
# ---------------------------------------------------------------------------------------------


def shared_folder() -> Path:
    """The shared folder beside the repository (``../shared``)."""
    return SHARED


def time_predict(
    config: CoupledMambaConfig, clip: Path, device: str, threads: int
) -> dict[str, Any]:
    """One ``/v1/predict`` of ``clip`` through ``service.main.create_app`` in-process.

    The model is a fresh ``CoupledMambaForSentiment(config)`` (timings do not depend on its
    weights). A first request warms every path; the second one is reported. Returns
    ``{"clip", "modalities", "found", "first_total_ms", "timings_ms", "scan_backend"}`` or
    ``{"error": why}``; it never raises (a missing extractor on a bare GPU host is a result).
    """
    if not clip.exists():
        return {"error": f"clip {clip} not found"}
    try:
        from fastapi.testclient import TestClient

        from service.main import create_app
        from service.settings import ServiceSettings

        settings = ServiceSettings(
            device=device, torch_threads=threads, max_batch_size=1, enable_media=True
        )
        torch.manual_seed(0)
        app = create_app(settings, model=CoupledMambaForSentiment(config))
        answers: list[dict[str, Any]] = []
        with TestClient(app) as client:
            if not app.state.core.wait_started(600):
                return {"error": "the service did not finish starting in 600 s"}
            for _ in range(2):
                with clip.open("rb") as fh:
                    response = client.post("/v1/predict", files={"file": (clip.name, fh)})
                if response.status_code != 200:
                    return {"error": f"/v1/predict answered {response.status_code}: "
                            f"{response.text[:300]}"}  # fmt: skip
                answers.append(response.json())
    except Exception as error:  # reported in the doc instead of stopping the benchmark
        return {"error": f"{type(error).__name__}: {error}"}
    first, second = answers
    name = str(clip.relative_to(ROOT.parent)) if clip.is_relative_to(ROOT.parent) else str(clip)
    return {
        "clip": name,
        "modalities": ", ".join(config.modalities),
        "found": second.get("modalities", {}),
        "scan_backend": second.get("model", {}).get("scan_backend"),
        "first_total_ms": float(first["timings_ms"].get("total", float("nan"))),
        "timings_ms": {k: float(v) for k, v in second["timings_ms"].items()},
    }

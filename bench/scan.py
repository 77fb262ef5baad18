"""Coupled selective scan benchmark: ms per forward for each backend, peak memory, ratios.

Shapes are batch x L x d_inner with d_state 16 and M = 3 modalities, called like the model calls
the scan (D, z, delta_bias with softplus, mean coupling; Mamba's A and dt init).

    python bench/scan.py                   # CPU: ref and torch backends, forward (+ training)
    python bench/scan.py --candidates      # CPU: the torch backend against the forms it beat
    python bench/scan.py --write-docs      # also rewrite docs/PERFORMANCE.md (scan or gpu section)
    python bench/scan.py --report FILE     # also write the tables to FILE (markdown)
    python bench/scan.py --layer-ab REV    # CPU: the model at git revision REV against this tree

On a CUDA machine it times ref, torch and triton on the GPU, the triton/torch ratio, the triton
kernel's effective memory bandwidth and a sweep of its launch configuration.

CPU peak memory is the growth of the process's peak RSS during the calls, so each CPU measurement
runs in its own subprocess. GPU peak memory is torch.cuda.max_memory_allocated above the inputs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, ROOT, write_blocks, write_section
from model.ops import coupled_selective_scan

SHAPES = [(1, 50, 256), (1, 500, 512), (1, 2000, 512), (32, 50, 256), (32, 500, 512)]
TRAIN_SHAPES = [(32, 50, 256), (1, 500, 512), (8, 500, 256)]
M, N_STATE = 3, 16
DOC = DOCS / "PERFORMANCE.md"
# CPU ref at this many state-steps (M*b*D*N*L) needs > 3 GB and tens of seconds: skipped.
REF_CPU_LIMIT = 2e8
NOMINAL_PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800}


def shape_name(shape: tuple[int, int, int]) -> str:
    return "x".join(str(s) for s in shape)


def make_inputs(
    shape: tuple[int, int, int], device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Mamba-like inputs: A = -(1..N), dt = softplus(delta + bias) near log-uniform [1e-3, 0.1]."""
    batch, length, dim = shape
    g = torch.Generator().manual_seed(0)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    dt0 = torch.exp(torch.rand(M, dim, generator=g) * (math.log(0.1) - math.log(1e-3)))
    dt0 = dt0 * 1e-3
    bias = dt0 + torch.log(-torch.expm1(-dt0))  # inverse softplus
    x = {
        "u": randn(M, batch, dim, length),
        "delta": randn(M, batch, dim, length) * 0.1,
        "A": -torch.arange(1, N_STATE + 1, dtype=torch.float32).repeat(M, dim, 1),
        "B": randn(M, batch, N_STATE, length),
        "C": randn(M, batch, N_STATE, length),
        "D": torch.ones(M, dim),
        "z": randn(M, batch, dim, length),
        "delta_bias": bias,
        "coupling": torch.full((M, M), 1.0 / M),
    }
    out: dict[str, Any] = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    out["delta_softplus"] = True
    return out


def scan_bytes(shape: tuple[int, int, int], elt: int = 4) -> int:
    """Bytes the triton kernel must move at least once: reads of u, delta, z (M*b*D*L each),
    B, C (M*b*N*L each), A (M*D*N), D, delta_bias (M*D each), W (M*M); writes of y (M*b*D*L)."""
    batch, length, dim = shape
    per_channel = M * batch * dim * length
    per_state = M * batch * N_STATE * length
    return elt * (4 * per_channel + 2 * per_state + M * dim * N_STATE + 2 * M * dim + M * M)


# --- candidate CPU forms of the torch backend (forward, float32, no grad) -----------------------


def _tm(x: torch.Tensor) -> torch.Tensor:
    return x.permute(3, 0, 1, 2).contiguous()


def cand_time_major_precompute(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    W: torch.Tensor, *, chunk: int | None = None, mix: str = "mm",
) -> torch.Tensor:  # fmt: skip
    """dA = exp(dt A) and dB u precomputed (whole sequence or per chunk), time-major state."""
    Mm, b, D, L = u.shape
    T = chunk or L
    dt_t, dtu_t, B_t, C_t = _tm(dt), _tm(dt * u), _tm(B), _tm(C)
    h = u.new_zeros(Mm, b * D * N_STATE)
    ys = []
    for t0 in range(0, L, T):
        t1 = min(L, t0 + T)
        dA = torch.exp(dt_t[t0:t1, ..., None] * A[:, None])  # (T, M, b, D, N)
        dBu = dtu_t[t0:t1, ..., None] * B_t[t0:t1, :, :, None, :]
        hs = torch.empty(dA.shape, dtype=dA.dtype)
        for i in range(t1 - t0):
            mixed = torch.mm(W, h) if mix == "mm" else torch.einsum("mk,kx->mx", W, h)
            h = hs[i].view(Mm, -1)
            torch.addcmul(dBu[i].view(Mm, -1), dA[i].view(Mm, -1), mixed, out=h)
        ys.append((hs * C_t[t0:t1, :, :, None, :]).sum(-1))
    return torch.cat(ys).permute(1, 2, 3, 0)


def cand_per_step_exp(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    W: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """exp(dt A) per step, ref layout (M, b, D, L), einsum mix, new tensors each step."""
    h = u.new_zeros(*u.shape[:3], N_STATE)
    ys = []
    for t in range(u.shape[-1]):
        dA = torch.exp(dt[..., t, None] * A[:, None])
        dBu = (dt[..., t] * u[..., t])[..., None] * B[:, :, None, :, t]
        h = dA * torch.einsum("mk,kbdn->mbdn", W, h) + dBu
        ys.append(torch.einsum("mbdn,mbn->mbd", h, C[..., t]))
    return torch.stack(ys, -1)


def _step(
    h: torch.Tensor, W: torch.Tensor, dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    mixed = (W[:, :, None, None, None] * h[None]).sum(1)
    h = torch.exp(dt[..., None] * A[:, None]) * mixed + (dt * u)[..., None] * B[:, :, None, :]
    return h, (h * C[:, :, None, :]).sum(-1)


def _chunk16(
    h: torch.Tensor, W: torch.Tensor, dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    ys = []
    for i in range(16):
        h, y = _step(h, W, dt[i], u[i], A, B[i], C[i])
        ys.append(y)
    return h, torch.stack(ys)


_compiled: dict[str, Callable[..., Any]] = {}


def cand_compiled(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    W: torch.Tensor, *, unroll: bool,
) -> torch.Tensor:  # fmt: skip
    """torch.compile (inductor, dynamic shapes) of one step, or of 16 unrolled steps."""
    key = "chunk16" if unroll else "step"
    if key not in _compiled:
        _compiled[key] = torch.compile(_chunk16 if unroll else _step, dynamic=True)
    fn = _compiled[key]
    dt_t, u_t, B_t, C_t = _tm(dt), _tm(u), _tm(B), _tm(C)
    h = u.new_zeros(*u.shape[:3], N_STATE)
    ys, t, L = [], 0, u.shape[-1]
    if unroll:
        while t + 16 <= L:
            h, y = fn(h, W, dt_t[t : t + 16], u_t[t : t + 16], A, B_t[t : t + 16], C_t[t : t + 16])
            ys.append(y)
            t += 16
        step = _compiled.setdefault("step", torch.compile(_step, dynamic=True))
    else:
        step = fn
    for i in range(t, L):
        h, y = step(h, W, dt_t[i], u_t[i], A, B_t[i], C_t[i])
        ys.append(y[None])
    return torch.cat(ys).permute(1, 2, 3, 0)


CANDIDATES: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    "precompute-all": (
        "time-major, exp(dt A) and dt B u for the whole sequence, mm mix",
        lambda *a: cand_time_major_precompute(*a),
    ),
    "precompute-chunk16": (
        "same, precomputed per chunk of 16 steps",
        lambda *a: cand_time_major_precompute(*a, chunk=16),
    ),
    "precompute-chunk64-einsum": (
        "per chunk of 64 steps, einsum mix",
        lambda *a: cand_time_major_precompute(*a, chunk=64, mix="einsum"),
    ),
    "per-step-ref-layout": (
        "exp per step in ref layout (M,b,D,L), einsum mix, fresh tensors",
        cand_per_step_exp,
    ),
    "compile-step": (
        "torch.compile(dynamic=True) of one step; Python loop over steps",
        lambda *a: cand_compiled(*a, unroll=False),
    ),
    "compile-chunk16": (
        "torch.compile(dynamic=True) of 16 unrolled steps",
        lambda *a: cand_compiled(*a, unroll=True),
    ),
}


def candidate_call(name: str, x: dict[str, Any]) -> Callable[[], Any]:
    """A no-argument forward of candidate ``name`` on the benchmark inputs (recurrence + D, z)."""
    if name in ("ref", "torch"):
        return lambda: coupled_selective_scan(**x, backend=name)
    fn = CANDIDATES[name][1]

    def run() -> torch.Tensor:
        dt = F.softplus(x["delta"] + x["delta_bias"][:, None, :, None])
        y = fn(x["u"], dt, x["A"], x["B"], x["C"], x["coupling"])
        return (y + x["u"] * x["D"][:, None, :, None]) * F.silu(x["z"])

    return run


# --- measurement --------------------------------------------------------------------------------


def time_cpu(fn: Callable[[], Any], reps: int) -> float:
    """Median ms of ``reps`` calls after one warm-up call (one call if the warm-up took > 5 s)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 5:
        reps = 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_cpu(spec: dict[str, Any]) -> dict[str, Any]:
    """Run inside a fresh subprocess: time one (backend or candidate, shape, mode)."""
    torch.set_num_threads(spec["threads"])
    batch, length, dim = spec["shape"]
    x = make_inputs((batch, length, dim))
    if spec["mode"] == "train":
        leaves = {k: v.requires_grad_(True) for k, v in x.items() if isinstance(v, torch.Tensor)}
        x.update(leaves)

        def fn() -> None:
            y = coupled_selective_scan(**x, backend=spec["name"])
            assert isinstance(y, torch.Tensor)
            torch.autograd.grad(y.square().mean(), list(leaves.values()))

    else:
        call = candidate_call(spec["name"], x)

        def fn() -> None:
            with torch.no_grad():
                call()

    base = peak_rss_mb()
    t0 = time.perf_counter()
    fn()
    first_s = time.perf_counter() - t0
    ms = time_cpu(fn, spec["reps"])
    return {"ms": ms, "peak_mb": peak_rss_mb() - base, "first_s": first_s}


def measure_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Run inside a fresh subprocess: time several forms on one shape, round-robin, so that
    a change in machine load hits every form alike. Returns {name: {ms, first_s}}."""
    torch.set_num_threads(spec["threads"])
    batch, length, dim = spec["shape"]
    x = make_inputs((batch, length, dim))
    calls = {name: candidate_call(name, x) for name in spec["names"]}
    out: dict[str, Any] = {}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()  # warm-up; compiles the compiled forms
            out[name] = {"first_s": time.perf_counter() - t0}
        for _ in range(spec["reps"]):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    for name in calls:
        out[name]["ms"] = statistics.median(times[name]) * 1e3
    return out


def run_subprocess(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"OMP_NUM_THREADS": str(spec["threads"])},
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return dict(json.loads(lines[-1]))


def time_cuda(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median ms per call with CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cuda_back_to_back(fn: Callable[[], Any], calls: int = 20) -> float:
    """ms per call of ``calls`` asynchronous calls queued between two events: the GPU time of
    the work itself, with launch overhead hidden (use with calls that do not synchronise)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy rate, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / ms / 1e6


def cuda_peak_mb(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# --- reports ------------------------------------------------------------------------------------


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    parts = [
        f"{datetime.date.today().isoformat()}",
        f"CPU {cpu} ({os.cpu_count()} logical cores)",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        "load average {:.1f} {:.1f} {:.1f} at start".format(*os.getloadavg()),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.insert(1, f"GPU {props.name} ({props.multi_processor_count} SMs)")
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_ms(r: dict[str, Any] | None) -> str:
    if r is None:
        return "skipped"
    if "error" in r:
        return f"error: {r['error']}"
    return f"{r['ms']:.1f}" if r["ms"] >= 10 else f"{r['ms']:.2f}"


def fmt_mb(r: dict[str, Any] | None) -> str:
    return f"{r['peak_mb']:.0f}" if r and "peak_mb" in r else "-"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or "ms" not in a or "ms" not in b:
        return "-"
    return f"{a['ms'] / b['ms']:.1f}x"


def cpu_forward(args: argparse.Namespace) -> str:
    rows = []
    for shape in SHAPES:
        batch, length, dim = shape
        spec = {"shape": shape, "threads": args.threads, "reps": args.reps, "mode": "forward"}
        big = M * batch * dim * N_STATE * length > REF_CPU_LIMIT
        ref = None if big else run_subprocess(spec | {"name": "ref"})
        fast = run_subprocess(spec | {"name": "torch"})
        rows.append([shape_name(shape), fmt_ms(ref), fmt_ms(fast), ratio(ref, fast),
                     fmt_mb(ref), fmt_mb(fast)])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    text = table(
        ["b x L x D", "ref ms", "torch ms", "ref/torch", "ref peak MB", "torch peak MB"], rows
    )
    return (
        f"Forward, no grad, float32, M={M}, N={N_STATE}, with D, z, delta_bias+softplus, mean "
        f"coupling; {args.threads} thread(s), median of {args.reps}. Peak MB: growth of peak "
        f"RSS. ref is skipped where M*b*D*N*L > {REF_CPU_LIMIT:.0e} (> 3 GB, tens of seconds); "
        f"triton is GPU-only (its CPU path is the interpreter).\n\n{text}\n"
    )


def cpu_train(args: argparse.Namespace) -> str:
    rows = []
    for shape in TRAIN_SHAPES:
        spec = {"shape": shape, "threads": args.threads, "reps": args.reps, "mode": "train"}
        ref = run_subprocess(spec | {"name": "ref"})
        fast = run_subprocess(spec | {"name": "torch"})
        rows.append([shape_name(shape), fmt_ms(ref), fmt_ms(fast), ratio(ref, fast),
                     fmt_mb(ref), fmt_mb(fast)])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    text = table(
        ["b x L x D", "ref ms", "torch ms", "ref/torch", "ref peak MB", "torch peak MB"], rows
    )
    return (
        "Training step of the scan alone (forward + backward to all nine inputs), float32: ref "
        "is autograd through the loop, torch is the hand-written backward.\n\n" + text + "\n"
    )


def cpu_candidates(args: argparse.Namespace) -> str:
    names = ["ref", *CANDIDATES, "torch"]
    rows = []
    for shape in SHAPES:
        batch, length, dim = shape
        big = M * batch * dim * N_STATE * length > REF_CPU_LIMIT
        run = [n for n in names if not (big and n in ("ref", "precompute-all"))]
        spec = {"shape": shape, "threads": args.threads, "reps": args.reps, "names": run}
        result = run_subprocess(spec, timeout=1800)
        row = [shape_name(shape)]
        for name in names:
            r = result.get(name) if "error" not in result else result
            cell = fmt_ms(r) if name in run else "skipped"
            if name.startswith("compile") and r and "first_s" in r:
                cell += f" (first call {r['first_s']:.0f} s)"
            row.append(cell)
        rows.append(row)
        print(" | ".join(row), flush=True)
    legend = "\n".join(f"- `{n}`: {CANDIDATES[n][0]}" for n in CANDIDATES)
    return (
        f"Forms measured for the torch backend: forward, no grad, float32, {args.threads} "
        f"thread(s), ms, median of {args.reps} rounds in which every form runs once in turn "
        f"(one process per shape, so load changes hit all forms alike). `torch` is the kept "
        f"form: time-major, exp per step in place, mm mix, y per chunk of 32 steps. The "
        f"compiled forms' first call includes compilation (per process and per batch-1 / "
        f"batch-n specialisation), with inductor's on-disk cache already warm.\n\n{legend}\n\n"
        + table(["b x L x D", *names], rows)
        + "\n"
    )


def kernel_only(x: dict[str, Any], **launch: Any) -> Any:
    """Launch the triton kernel alone: no input validation, no read-back of its NaN flag."""
    from model.ops.scan_triton import launch_forward

    return launch_forward(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
        x["delta_softplus"], x["coupling"], False, **launch,
    )  # fmt: skip


def gpu_report(args: argparse.Namespace) -> str:
    from model.ops.scan_triton import DEFAULT_TIME_TILE, default_block_d

    device = "cuda"
    props = torch.cuda.get_device_properties(0)
    peak = next((v for k, v in NOMINAL_PEAK_GBS.items() if k in props.name), None)
    copy_gbs = copy_bandwidth_gbs()

    rows = []
    for shape in SHAPES:
        x = make_inputs(shape, device)
        res: dict[str, dict[str, Any]] = {}
        for name in ("ref", "torch", "triton"):

            def call(name: str = name, x: dict[str, Any] = x) -> Any:
                with torch.no_grad():
                    return coupled_selective_scan(**x, backend=name)

            reps = 5 if name != "triton" else 50
            res[name] = {"ms": time_cuda(call, reps), "peak_mb": cuda_peak_mb(call)}
        kernel_ms = time_cuda_back_to_back(functools.partial(kernel_only, x))
        gbs = scan_bytes(shape) / kernel_ms / 1e6
        rows.append([shape_name(shape), fmt_ms(res["ref"]), fmt_ms(res["torch"]),
                     f"{res['triton']['ms']:.3f}", f"{kernel_ms:.3f}",
                     ratio(res["torch"], res["triton"]),
                     ratio(res["ref"], res["triton"]), f"{gbs:.0f}",
                     f"{100 * gbs / peak:.0f}%" if peak else "-",
                     fmt_mb(res["ref"]), fmt_mb(res["torch"]), fmt_mb(res["triton"])])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    main = table(
        ["b x L x D", "ref ms", "torch ms", "triton ms", "kernel ms", "torch/triton", "ref/triton",
         "triton GB/s", "of peak", "ref MB", "torch MB", "triton MB"],
        rows,
    )  # fmt: skip

    # Launch configurations of the kernel at the largest shape.
    shape = SHAPES[-1]
    x = make_inputs(shape, device)
    sweep = []
    best: tuple[float, int, int, int] | None = None
    for configuration in itertools.product((8, 16, 32), (1, 2, 4), (1, 8)):
        block_d, num_warps, time_tile = configuration

        def launch(b: int = block_d, w: int = num_warps, t: int = time_tile) -> Any:
            return kernel_only(x, block_d=b, num_warps=w, time_tile=t)

        ms = time_cuda_back_to_back(launch)
        gbs = scan_bytes(shape) / ms / 1e6
        sweep.append([*(str(c) for c in configuration), f"{ms:.3f}", f"{gbs:.0f}"])
        if best is None or ms < best[0]:
            best = (ms, *configuration)
    assert best is not None
    default = default_block_d(shape[0], shape[2], torch.device(device))
    sweep_text = table(["block_d", "num_warps", "time_tile", "ms", "GB/s"], sweep)

    # Training step on the GPU: triton forward + torch-backend recompute for backward.
    train_rows = []
    for shape in TRAIN_SHAPES:
        x = make_inputs(shape, device)
        leaves = {k: v.requires_grad_(True) for k, v in x.items() if isinstance(v, torch.Tensor)}
        x.update(leaves)
        res = {}
        for name in ("torch", "triton"):

            def step(
                name: str = name, x: dict[str, Any] = x, leaves: dict[str, Any] = leaves
            ) -> None:
                y = coupled_selective_scan(**x, backend=name)
                assert isinstance(y, torch.Tensor)
                torch.autograd.grad(y.square().mean(), list(leaves.values()))

            res[name] = {"ms": time_cuda(step, 5)}
        train_rows.append([shape_name(shape), fmt_ms(res["torch"]), fmt_ms(res["triton"])])
    train = table(["b x L x D", "torch fwd+bwd ms", "triton fwd + torch bwd ms"], train_rows)

    return (
        f"Forward, no grad, float32, M={M}, N={N_STATE}, with D, z, delta_bias+softplus, mean "
        f"coupling; median of CUDA-event timings of whole calls (validation, launch, one read "
        f"of the kernel's NaN flag). `kernel ms`: 20 launches queued back to back, per launch; "
        f"GB/s and the sweep use it. Bytes counted for GB/s: reads of u, delta, z, "
        f"B, C, A, D, delta_bias, W and writes of y, each once (B and C are re-read by every "
        f"channel block, from L2; not counted). Nominal peak: {peak or 'unknown'} GB/s; "
        f"device-to-device copy measured {copy_gbs:.0f} GB/s (read + write). Target: "
        f"torch/triton >= 20x at 32x500x512 and >= 50% of peak.\n\n{main}\n\n"
        f"Launch sweep at {shape_name(shape)} (defaults here: block_d {default}, one warp, "
        f"time_tile {DEFAULT_TIME_TILE}; best: block_d={best[1]}, num_warps={best[2]}, "
        f"time_tile={best[3]}, {best[0]:.3f} ms):\n\n{sweep_text}\n\n"
        f"Training step (forward + backward to all inputs):\n\n{train}\n"
    )


# -- the model's code path: A/B against an earlier revision --------------------------------------

AB_INFERENCE = [(1, 64), (16, 64), (1, 512), (16, 256)]
AB_TRAIN = [(16, 64), (4, 256)]


def load_model_module(rev: str) -> types.ModuleType:
    """``model/mamba.py`` as of git revision ``rev``, imported as a separate module (it runs on
    this tree's ``model.ops`` and ``model.config``)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:model/mamba.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    name = "baseline_mamba_" + re.sub(r"\W", "_", rev)
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:model/mamba.py"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _ab_inputs(model: Any, batch: int, length: int, seed: int) -> tuple[dict[str, Any], ...]:
    """Features (b, L, F) and masks with ragged lengths (a quarter of the batch padded)."""
    g = torch.Generator().manual_seed(seed)
    dims = model.config.feature_dims
    features = {m: torch.randn(batch, length, f, generator=g) for m, f in dims.items()}
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[: max(1, batch // 4), length - length // 3 :] = False
    return features, {m: valid.clone() for m in dims}


def layer_ab(rev: str, reps: int, threads: int) -> str:
    """Time the whole model's forward (no grad) and training step (forward + backward) of the
    shipped checkpoints' architectures, revision ``rev`` against this tree, interleaved in one
    process on the same weights and inputs; and the largest difference of their answers."""
    from model import CoupledMambaForSentiment
    from model.checkpoint import read_checkpoint_config
    from model.checkpoints import default_checkpoint_path, text_only_checkpoint_path

    torch.set_num_threads(threads)
    baseline = load_model_module(rev)
    rows, train_rows = [], []
    for label, folder in (
        ("default", default_checkpoint_path()),
        ("text-only", text_only_checkpoint_path()),
    ):
        config, _ = read_checkpoint_config(folder)
        torch.manual_seed(0)
        new = CoupledMambaForSentiment(config, scan_backend="torch").eval()
        old = baseline.CoupledMambaForSentiment(config, scan_backend="torch").eval()
        old.load_state_dict(new.state_dict())
        models = {"old": old, "new": new}
        for batch, length in AB_INFERENCE:
            features, masks = _ab_inputs(new, batch, length, seed=batch * length)
            infer = functools.partial(_infer, features=features, masks=masks)
            times, answers = _interleaved(models, infer, reps)
            diff = max(
                (answers["new"].score - answers["old"].score).abs().max().item(),
                (answers["new"].probabilities - answers["old"].probabilities).abs().max().item(),
            )
            rows.append(_ab_row(label, batch, length, times, diff))
        for batch, length in AB_TRAIN:
            features, masks = _ab_inputs(new, batch, length, seed=batch + length)
            step = functools.partial(_train_step, features=features, masks=masks)
            times, grads = _interleaved(models, step, reps)
            diff = max(
                ((grads["new"][n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                for n, g in grads["old"].items()
            )
            train_rows.append(_ab_row(label, batch, length, times, diff))
    header = ["checkpoint", "b x L", "old ms", "new ms", "new/old"]
    return (
        f"The model's forward, old code path (`{rev}:model/mamba.py`) against this tree's, on the "
        f"shipped checkpoints' architectures (random weights, shared by both), 3 or 1 "
        f"modalities, a quarter of the batch padded by a third; {threads} thread(s), CPU, "
        f"torch backend; ms of CPU time of the calling thread (all of the work with one thread; "
        f"time spent descheduled on the shared cores is not counted), median of {reps} rounds "
        f"in which the two run in turn, in alternating order, on the same inputs (one process, "
        f"so load changes hit both alike).\n\n"
        f"Inference (no grad; `max |diff|`: largest difference of scores and probabilities):"
        f"\n\n{table([*header, 'max |diff|'], rows)}\n\n"
        f"Training step (forward + backward of a loss on both heads; `max rel diff`: largest "
        f"difference of a parameter's gradient over that gradient's largest value):\n\n"
        f"{table([*header, 'max rel diff'], train_rows)}\n"
    )


def _infer(model: Any, features: dict[str, Any], masks: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(features, masks)


def _train_step(model: Any, features: dict[str, Any], masks: dict[str, Any]) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    out = model(features, masks)
    (out.score.square().mean() + out.logits.logsumexp(-1).mean()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _interleaved(
    models: dict[str, Any], call: Callable[[Any], Any], reps: int
) -> tuple[dict[str, float], dict[str, Any]]:
    results = {name: call(model) for name, model in models.items()}  # warm-up, answers
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models.items())
    for _ in range(reps):
        order.reverse()  # each goes first in every other round (the first call runs colder)
        for name, model in order:
            t0 = time.thread_time()  # one thread: the CPU time this call used, not the wait
            call(model)
            times[name].append(time.thread_time() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, results


def _ab_row(label: str, batch: int, length: int, times: dict[str, float], diff: float) -> list[str]:
    old, new = times["old"], times["new"]
    print(f"{label} {batch}x{length}: old {old:.1f} ms, new {new:.1f} ms, diff {diff:.2e}")
    return [
        label,
        f"{batch}x{length}",
        f"{old:.1f}",
        f"{new:.1f}",
        f"{new / old:.2f}",
        f"{diff:.1e}",
    ]


def write_docs(section: str, parts: dict[str, str]) -> None:
    """Rewrite blocks of one section of docs/PERFORMANCE.md, keeping the others."""
    title = "Coupled selective scan" if section == "scan" else "Coupled selective scan on a GPU"
    write_blocks(DOC, section, parts, heading=f"### {title} (`bench/scan.py`)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--candidates", action="store_true", help="compare torch-backend forms")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step table")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--report", type=Path, help="also write the tables to this file")
    parser.add_argument(
        "--layer-ab", metavar="REV", help="time the model at git revision REV against this tree"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        spec = json.loads(args.measure)
        measure = measure_interleaved if "names" in spec else measure_cpu
        print(json.dumps(measure(spec)))
        return 0

    info = machine_info()
    print(info, flush=True)
    if args.layer_ab:
        body = f"Machine: {info}.\n\n" + layer_ab(args.layer_ab, max(args.reps, 5), args.threads)
        print("\n" + body)
        if args.report:
            args.report.write_text(f"# Model code path A/B\n\n{body}\n")
        if args.write_docs:
            write_section(DOC, "fast-path-ab", body, append=True)
        return 0
    parts: dict[str, str] = {}
    if torch.cuda.is_available():
        parts["results"] = f"Machine: {info}.\n\n" + gpu_report(args)
        section = "gpu"
    else:
        section = "scan"
        if args.candidates:
            parts["candidates"] = f"Machine: {info}.\n\n" + cpu_candidates(args)
        else:
            parts["forward"] = f"Machine: {info}.\n\n" + cpu_forward(args)
            if not args.no_train:
                parts["train"] = cpu_train(args)
    report = "\n\n".join(parts.values())
    print("\n" + report)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(f"# Scan benchmark ({section})\n\n{report}\n")
    if args.write_docs:
        write_docs(section, parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

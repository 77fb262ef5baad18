"""Coupled Mamba fusion vs cross-attention fusion: latency and peak memory against length.

The paper (arXiv 2405.18014) reports 49% faster inference and 83.7% less GPU memory than
cross-attention fusion. This script measures our model against the two baselines of
``bench/baselines.py`` with the same width and depth:

- ``ours``: ``model.CoupledMambaForSentiment`` (scan backend chosen once at load, reported;
  inference runs its layers over chunks of ``inference_chunk_size`` steps, recorded);
- ``(a)``: MulT-style cross-modal attention with the weights materialised;
- ``(b)``: the same network (same weights) on ``F.scaled_dot_product_attention``.

Method (the same on every device):

- inference mode, eval mode, float32, random features with every step valid;
- per setting (batch, L): one untimed call per model that measures peak memory and doubles as
  the warm-up, then ``repeats`` timed rounds; each round calls every model once, the starting
  model rotating from round to round, so that all three see the same machine state; the median
  of each model's rounds is reported, with the ratios;
- peak memory = bytes allocated above what was live when the call started (weights and inputs
  excluded, the output included). On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the
  profiler's view of PyTorch's CPU allocator (``torch.profiler`` with ``profile_memory``: every
  allocation and free through c10's allocator with its running total; scratch that MKL or
  oneDNN allocate by themselves is not seen). ``tracemalloc`` does not see tensor memory and
  ``ru_maxrss`` includes the interpreter, the allocator's cache and every earlier setting;
- a model whose memory for a setting is estimated over ``--mem-cap-gb`` is not run and is
  recorded as ``OOM (est. X GB)`` (for (a) the estimate is the two (b, H, L, L) matrices that
  are alive during the softmax; for the others, the last measured peak scaled linearly in L and
  batch); one whose single call is estimated over ``--max-call-s`` is recorded as
  ``skipped (est. X s)``; a real out-of-memory error is recorded as ``OOM``, not a crash;
- the linear memory claim: a least-squares line through our peaks at batch 1 gives bytes per
  time step, compared with what one layer must hold at once (derived in
  :func:`layer_activation_floor`);
- optionally one full ``/v1/predict`` of a shared clip through the service app in-process,
  split by stage (``timings_ms``).

Usage::

    python bench/fusion_efficiency.py                 # CPU, full run, rewrites docs/PERFORMANCE.md
    python bench/fusion_efficiency.py --quick         # tiny config and lengths, no doc
    python bench/fusion_efficiency.py --device cuda   # CUDA (scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

import torch

from bench.doc_sections import DOCS
from bench.fusion_measure import (
    DEFAULT_CLIP,
    FULL_BATCHES,
    FULL_LENGTHS,
    QUICK_BATCHES,
    QUICK_LENGTHS,
    TARGET_LENGTH,
    BenchOptions,
    Measurement,
    bench_config,
    breakdown_setting,
    build_models,
    layer_activation_floor,
    machine_summary,
    run_benchmark,
    run_breakdowns,
    shared_folder,
    time_predict,
)
from bench.fusion_report import (
    explain_misses,
    fit_memory_slope,
    render_markdown,
    target_verdicts,
    write_doc_section,
)
from model import CoupledMambaForSentiment

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny config and lengths, no doc")
    parser.add_argument("--lengths", type=_int_list, default=None, help="e.g. 64,256,1024")
    parser.add_argument("--batches", type=_int_list, default=None, help="e.g. 1,16")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of the baselines")
    parser.add_argument(
        "--mem-cap-gb",
        type=float,
        default=None,
        help="skip a model whose estimated memory exceeds this (default: 4 on CPU, the "
        "device's memory on CUDA)",
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        help="skip a model whose estimated single call exceeds this (default: 30 on CPU, 60 "
        "on CUDA)",
    )
    parser.add_argument(
        "--long-round-s",
        type=float,
        default=None,
        help="time 2 rounds, not --repeats, where one round is estimated over this (default: "
        "60 on CPU, no limit on CUDA)",
    )
    parser.add_argument("--scan-backend", default="auto", help="scan backend of our model")
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="doc to write the section to (default docs/PERFORMANCE.md unless --quick)",
    )
    parser.add_argument("--no-doc", action="store_true", help="do not write any doc")
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    parser.add_argument(
        "--render-json",
        type=Path,
        default=None,
        help="measure nothing: write the doc section from a --json file of an earlier run "
        "(e.g. one fetched from a GPU host)",
    )
    parser.add_argument(
        "--predict-clip",
        type=Path,
        default=None,
        help=f"clip for the /v1/predict timing (default ../shared/{DEFAULT_CLIP}; not in --quick)",
    )
    parser.add_argument("--no-predict", action="store_true", help="skip the /v1/predict timing")
    parser.add_argument(
        "--no-breakdown", action="store_true", help="skip itemising the memory peak (CPU)"
    )
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Fill in the per-device and --quick defaults."""
    cuda = str(args.device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    mem_cap = args.mem_cap_gb
    if mem_cap is None:
        if cuda:
            mem_cap = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 1e9
        else:
            mem_cap = 4.0
    max_call = args.max_call_s if args.max_call_s is not None else (60.0 if cuda else 30.0)
    long_round = args.long_round_s
    if long_round is None:
        long_round = math.inf if cuda else 60.0
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    return BenchOptions(
        device=str(args.device),
        lengths=tuple(lengths),
        batches=tuple(batches),
        repeats=max(1, args.repeats),
        threads=args.threads,
        heads=args.heads,
        mem_cap_gb=float(mem_cap),
        max_call_s=float(max_call),
        long_round_s=float(long_round),
        scan_backend=args.scan_backend,
        quick=bool(args.quick),
    )


@dataclass
class RunResults:
    """Everything a doc block is rendered from; saved with ``--json``, re-rendered with
    ``--render-json`` (e.g. results fetched from a GPU host)."""

    options: BenchOptions
    machine: dict[str, Any]
    table: list[dict[str, Measurement]]
    predict: dict[str, Any] | None = None
    breakdown: dict[str, list[tuple[str, int]]] | None = None
    breakdown_at: tuple[int, int] | None = None

    def to_json(self) -> str:
        payload = {
            "options": asdict(self.options),
            "machine": self.machine,
            "results": [
                {name: {**asdict(m), "median_s": m.median_s} for name, m in row.items()}
                for row in self.table
            ],
            "predict": self.predict,
            "breakdown": self.breakdown,
            "breakdown_at": self.breakdown_at,
        }
        return json.dumps(payload, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunResults:
        data = json.loads(text)
        opts = dict(data["options"])
        opts["lengths"] = tuple(opts["lengths"])
        opts["batches"] = tuple(opts["batches"])
        table = [
            {
                name: Measurement(
                    model=m["model"],
                    batch=m["batch"],
                    length=m["length"],
                    status=m["status"],
                    note=m["note"],
                    times_s=list(m["times_s"]),
                    peak_bytes=m["peak_bytes"],
                )
                for name, m in row.items()
            }
            for row in data["results"]
        ]
        breakdown = data.get("breakdown")
        if breakdown is not None:
            breakdown = {k: [(str(a), int(b)) for a, b in v] for k, v in breakdown.items()}
        at = data.get("breakdown_at")
        return cls(
            options=BenchOptions(**opts),
            machine=data["machine"],
            table=table,
            predict=data.get("predict"),
            breakdown=breakdown,
            breakdown_at=(int(at[0]), int(at[1])) if at else None,
        )


def write_results(results: RunResults, doc: Path | None) -> None:
    """Render ``results`` into the fusion section of ``doc`` (models rebuilt on CPU for their
    parameter counts)."""
    options = results.options
    config = bench_config(options.quick)
    models = build_models(config, torch.device("cpu"), options.heads, "ref", options.seed)
    block = render_markdown(
        options,
        config,
        models,
        results.table,
        results.machine,
        results.predict,
        results.breakdown,
        results.breakdown_at,
    )
    device_kind = "cuda" if options.device.startswith("cuda") else "cpu"
    if doc is not None:
        write_doc_section(doc, device_kind, block)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    default_doc = None if args.no_doc else (args.doc or DOCS / "PERFORMANCE.md")
    if args.render_json is not None:
        write_results(RunResults.from_json(args.render_json.read_text()), default_doc)
        return 0
    options = options_from_args(args)
    started = time.perf_counter()
    print(f"fusion benchmark on {options.device}: lengths {options.lengths}, batches "
          f"{options.batches}, {options.repeats} rounds, {options.threads} thread(s)")  # fmt: skip
    config, models, table = run_benchmark(options)
    ours = models["ours"]
    assert isinstance(ours, CoupledMambaForSentiment)
    machine = machine_summary(options, ours.scan_backend)
    machine["inference_chunk_size"] = ours.inference_chunk_size
    results = RunResults(options, machine, table)
    for line in target_verdicts(table, TARGET_LENGTH) + explain_misses(
        table, config, options.heads
    ):
        print(line)
    for batch in options.batches:
        fit = fit_memory_slope(table, batch)
        if fit is not None:
            print(f"memory slope of ours at batch {batch}: {fit.slope:,.0f} B per step "
                  f"(R^2 {fit.r2:.4f}); layer floor "
                  f"{layer_activation_floor(config)['floor'] * batch:,} B per step")  # fmt: skip

    if not args.no_predict and not options.quick:
        clip = args.predict_clip or shared_folder() / DEFAULT_CLIP
        print(f"timing /v1/predict on {clip} ...")
        results.predict = time_predict(config, clip, options.device, options.threads)
        print(json.dumps(results.predict, default=str))

    setting = breakdown_setting(table)
    if options.device == "cpu" and setting is not None and not args.no_breakdown:
        print(f"itemising the memory peak at batch {setting[0]}, L = {setting[1]} ...")
        results.breakdown = run_breakdowns(models, config, options, setting)
        results.breakdown_at = setting

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(results.to_json())
    write_results(results, None if options.quick and args.doc is None else default_doc)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

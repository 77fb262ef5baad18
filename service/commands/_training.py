"""Arguments and helpers shared by ``cmamba train``, ``evaluate`` and ``extract``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Architecture knobs of :class:`model.CoupledMambaConfig` (defaults: the paper's)."""
    group = parser.add_argument_group("model (defaults: the paper's)")
    group.add_argument("--d-model", type=int, default=128)
    group.add_argument("--d-state", type=int, default=64)
    group.add_argument("--d-conv", type=int, default=4)
    group.add_argument("--expand", type=int, default=2)
    group.add_argument("--layers", type=int, default=3)
    group.add_argument("--coupling", choices=("none", "mean", "sum", "learned"), default="learned")
    group.add_argument("--feature-mixing", action="store_true")
    group.add_argument("--pooling", choices=("mean", "last", "max"), default="mean")
    group.add_argument("--fusion", choices=("gate", "mean", "concat"), default="gate")
    group.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm")
    group.add_argument("--dropout", type=float, default=0.1)


def model_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``CoupledMambaConfig`` fields set by :func:`add_model_arguments`."""
    return {
        "d_model": args.d_model,
        "d_state": args.d_state,
        "d_conv": args.d_conv,
        "expand": args.expand,
        "n_layers": args.layers,
        "state_coupling": args.coupling,
        "feature_mixing": args.feature_mixing,
        "pooling": args.pooling,
        "fusion": args.fusion,
        "norm": args.norm,
        "dropout": args.dropout,
    }


def resolve_profile(description: Mapping[str, Any], dims: Mapping[str, int]) -> str:
    """The data's feature profile: as recorded, else the first profile with these dims."""
    recorded = description.get("feature_profile")
    if recorded:
        return str(recorded)
    from preprocessing import PROFILES

    for name, profile in PROFILES.items():
        if all(profile.dims.get(m) == d for m, d in dims.items()):
            return name
    return "custom-" + "-".join(f"{m}{d}" for m, d in dims.items())

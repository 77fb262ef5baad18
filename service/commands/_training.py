"""Arguments and helpers shared by ``cmamba train``, ``evaluate`` and ``extract``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from model.config import FUSIONS, NORMS, POOLINGS, STATE_COUPLINGS, CoupledMambaConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Architecture knobs of :class:`model.CoupledMambaConfig`, with its defaults (the paper's)
    and its choices."""
    base = CoupledMambaConfig()
    group = parser.add_argument_group("model (defaults: the paper's)")
    group.add_argument("--d-model", type=int, default=base.d_model, help="model width")
    group.add_argument("--d-state", type=int, default=base.d_state, help="SSM state size")
    group.add_argument("--d-conv", type=int, default=base.d_conv, help="causal conv width")
    group.add_argument("--expand", type=int, default=base.expand, help="inner width factor")
    group.add_argument("--layers", type=int, default=base.n_layers, help="Mamba layers")
    group.add_argument(
        "--coupling",
        choices=STATE_COUPLINGS,
        default=base.state_coupling,
        help="how the modalities' states are mixed in the scan (W)",
    )
    group.add_argument(
        "--feature-mixing",
        action=argparse.BooleanOptionalAction,
        default=base.feature_mixing,
        help="also mix the layer outputs with a Linear layer (the paper's released code)",
    )
    group.add_argument("--pooling", choices=POOLINGS, default=base.pooling, help="over time")
    group.add_argument(
        "--fusion", choices=FUSIONS, default=base.fusion, help="how pooled modalities combine"
    )
    group.add_argument("--norm", choices=NORMS, default=base.norm, help="normalisation layer")
    group.add_argument("--dropout", type=float, default=base.dropout, help="dropout rate")


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

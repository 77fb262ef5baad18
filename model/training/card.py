"""The MODEL_CARD.md that ``cmamba train`` writes next to a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MULTIMODAL_NOTE = (
    "Only the modalities listed above carry learned signal. Full multimodal accuracy needs "
    "training on a multimodal corpus such as CMU-MOSEI or CH-SIMS with these same tools "
    "(`cmamba extract`, `cmamba train`, `cmamba evaluate`)."
)


def _table(metrics: Mapping[str, float]) -> list[str]:
    lines = ["| metric | value |", "| --- | ---: |"]
    for key, value in metrics.items():
        shown = str(int(value)) if key == "N" else f"{value:.4f}"
        lines.append(f"| {key} | {shown} |")
    return lines


def training_model_card(
    *,
    name: str,
    version: str,
    config: Any,
    parameters: int,
    training: Mapping[str, Any],
    metrics: Mapping[str, Any],
) -> str:
    """A Markdown card: what the model was trained on, how, and how well it does on test."""
    data = training["data"]
    settings = training["settings"]
    low, high = config.label_scale
    dims = ", ".join(f"{m} {d}" for m, d in config.feature_dims.items())
    lines = [
        f"# {name} (version {version})",
        "",
        "Coupled Mamba sentiment model (arXiv 2405.18014) trained with `cmamba train`.",
        "",
        "## Training data",
        "",
        f"- dataset: `{training.get('data_path', data.get('source', '?'))}` "
        f"({data.get('format', data.get('name', 'feature cache'))})",
        f"- split sizes: {data['sizes']}",
        f"- modalities trained on: {', '.join(config.modalities)}; feature profile "
        f"`{config.feature_profile}` ({dims})",
        f"- label scale: [{low:g}, {high:g}]; metric set: {metrics['metric_set']}",
        "",
        "## Recipe",
        "",
        f"- Adam, lr {settings['lr']}, weight decay {settings['weight_decay']}, "
        f"{settings['loss']} loss"
        + (
            f" + {settings['class_loss_weight']} x cross-entropy (3-class head)"
            if settings["class_loss_weight"]
            else ""
        ),
        f"- batch {settings['batch_size']}, {training['epochs_run']} epochs run, best epoch "
        f"{training['best_epoch']} on validation {settings['select']}, seed {settings['seed']}",
        f"- architecture: d_model {config.d_model}, d_state {config.d_state}, "
        f"{config.n_layers} layers, coupling {config.state_coupling}, {config.pooling} pooling, "
        f"{config.fusion} fusion; {parameters:,} parameters",
        "",
        "## Test metrics",
        "",
        *_table(metrics.get("test", {})),
    ]
    by_group = metrics.get("test_by_group") or {}
    if by_group:
        lines += ["", "Per source (Pearson r, MAE, sign agreement over non-zero labels):", ""]
        for group, values in by_group.items():
            shown = ", ".join(
                f"{k} {int(v) if k == 'N' else round(v, 4)}" for k, v in values.items()
            )
            lines.append(f"- {group}: {shown}")
    lines += ["", "## Modalities", "", MULTIMODAL_NOTE, ""]
    return "\n".join(lines)

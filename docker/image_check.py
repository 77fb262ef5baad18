"""Checks run while the Docker image is built (see the Dockerfile); also usable on any host.

    python docker/image_check.py base --torch 2.13.0 --python 3.11 --cuda
        the interpreter, torch and CUDA build are the ones the image assumes
    python docker/image_check.py constraints constraints.txt
        print the project's constraints with the torch/triton pins replaced by the exact
        versions installed here, so that installing the project never replaces them
    python docker/image_check.py requirements pyproject.toml
        print the project's own dependencies, one a line (the image installs them in a layer
        of their own, before the project's source is copied)
    python docker/image_check.py final --torch 2.13.0 [--kernels] [--mamba-ssm]
        torch is untouched, every model the service needs is on disk (the checkpoint it will
        serve loads: CMAMBA_MODEL_PATH, else the embedded default; the registry packages'
        weights match their pinned checksums); with --kernels, causal-conv1d's CUDA extension
        imports; with --mamba-ssm, mamba-ssm's does too (and whether the checkpoint can use it
        is reported)

Each check prints what it found and exits non-zero with a plain message when it fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

# Pins that belong to the base image, not to the project's constraints.
BASE_IMAGE_PACKAGES = ("torch", "triton")


class CheckFailed(RuntimeError):
    """A check found the environment is not what the image needs."""


def _public_version(version: str) -> str:
    """``2.13.0+cu126`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def check_base(torch_version: str, python: str, cuda: bool) -> list[str]:
    """The interpreter is ``python`` (major.minor) and torch is ``torch_version`` (CUDA build)."""
    found = f"{sys.version_info.major}.{sys.version_info.minor}"
    if found != python:
        raise CheckFailed(
            f"Python {found} found, {python} needed (the project pins wheels for {python}); "
            "pick a base image tag whose Python is that version."
        )
    import torch

    if _public_version(torch.__version__) != torch_version:
        raise CheckFailed(f"torch {torch.__version__} found, {torch_version} expected")
    if cuda and torch.version.cuda is None:
        raise CheckFailed(f"torch {torch.__version__} is not a CUDA build")
    return [f"python {found}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]


def image_constraints(constraints: str) -> str:
    """The constraints text with base-image packages pinned to what is installed here."""
    kept: list[str] = []
    for line in constraints.splitlines():
        name = re.split(r"[=<>!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name in BASE_IMAGE_PACKAGES:
            continue
        kept.append(line)
    for package in BASE_IMAGE_PACKAGES:
        try:
            kept.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(kept) + "\n"


def project_requirements(pyproject: str) -> str:
    """The ``[project] dependencies`` of a pyproject.toml, one a line."""
    import tomllib

    dependencies = tomllib.loads(pyproject)["project"]["dependencies"]
    return "".join(f"{line}\n" for line in dependencies)


def check_models() -> list[str]:
    """Every model the service loads is on disk, without any download."""
    import model
    from preprocessing import models
    from service.settings import ServiceSettings

    found: list[str] = []
    checkpoint = ServiceSettings().model_path  # CMAMBA_MODEL_PATH, else the embedded default
    net = model.load_checkpoint(checkpoint)
    n_parameters = sum(p.numel() for p in net.parameters())
    found.append(f"checkpoint {checkpoint} ({n_parameters} parameters)")

    asr = models.bundled_asr_model_dir() / models.ASR_MODEL_FILE
    models.verify_model_file(asr, models.ASR_MODEL_SHA256)
    text = models.bundled_text_model_dir() / models.TEXT_MODEL_FILE
    models.verify_model_file(text, models.TEXT_MODEL_SHA256)
    found += [f"ASR model {asr}", f"text model {text}"]

    mediapipe = importlib.import_module("mediapipe")
    face_mesh = Path(mediapipe.__file__).parent / "modules/face_landmark/face_landmark.tflite"
    if not face_mesh.is_file():
        raise CheckFailed(f"the face mesh model {face_mesh} is missing from mediapipe")
    found.append(f"face mesh model {face_mesh}")
    return found


CONV_KERNEL_MODULES = ("causal_conv1d_cuda", "causal_conv1d")
SCAN_KERNEL_MODULES = ("selective_scan_cuda", "mamba_ssm")


def check_kernels(modules: tuple[str, ...]) -> list[str]:
    """The compiled CUDA extensions and packages ``modules`` import."""
    found = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CheckFailed(f"{module} does not import: {exc}") from exc
        found.append(f"{module} imports")
    return found


def scan_kernel_use() -> str:
    """Whether the checkpoint the service will serve can run mamba-ssm's scan (uncoupled
    layers only: its scan has no cross-modal state mix)."""
    from model.checkpoint import read_checkpoint_config
    from service.settings import ServiceSettings

    checkpoint = ServiceSettings().model_path
    coupling = read_checkpoint_config(checkpoint)[0].state_coupling
    if coupling == "none":
        return f"mamba-ssm's scan serves {checkpoint} (state_coupling 'none')"
    return (
        f"mamba-ssm's scan will not run for {checkpoint} (state_coupling {coupling!r}: coupled "
        "scans run the project's own kernel); MAMBA_SSM=0 builds the image without it"
    )


def check_final(torch_version: str, kernels: bool, mamba_ssm: bool = False) -> list[str]:
    """torch is still ``torch_version``; models (and kernels) are present."""
    import torch

    if _public_version(torch.__version__) != torch_version:
        raise CheckFailed(
            f"torch was replaced: {torch.__version__} found, the base image's {torch_version} "
            "expected"
        )
    found = [f"torch {torch.__version__}", *check_models()]
    if kernels:
        found += check_kernels(CONV_KERNEL_MODULES)
    if mamba_ssm:
        found += [*check_kernels(SCAN_KERNEL_MODULES), scan_kernel_use()]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    base = sub.add_parser("base")
    base.add_argument("--torch", required=True)
    base.add_argument("--python", required=True)
    base.add_argument("--cuda", action="store_true")
    constraints = sub.add_parser("constraints")
    constraints.add_argument("path", type=Path)
    final = sub.add_parser("final")
    final.add_argument("--torch", required=True)
    final.add_argument("--kernels", action="store_true")
    final.add_argument("--mamba-ssm", action="store_true")
    requirements = sub.add_parser("requirements")
    requirements.add_argument("path", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.check == "base":
            found = check_base(args.torch, args.python, args.cuda)
        elif args.check == "constraints":
            sys.stdout.write(image_constraints(args.path.read_text()))
            return 0
        elif args.check == "requirements":
            sys.stdout.write(project_requirements(args.path.read_text()))
            return 0
        else:
            found = check_final(args.torch, args.kernels, args.mamba_ssm)
    except Exception as exc:
        print(f"image check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for line in found:
        print(f"ok: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The wheels the GPU check host lacks for serving (``bench/load.py --device cuda``).

The GPU check runs on hosts whose image has Python 3.12 with PyTorch, Triton, numpy and many
other packages, but not the service's HTTP stack (FastAPI, uvicorn, pydantic...), and that
reach no network. This script finds what a features-only server imports (it starts
``cmamba serve --features-only`` here, for a few seconds, and maps the imported modules to
their distributions), leaves out what the GPU image already has, and downloads the rest, at the
versions pinned in constraints.txt, as Python 3.12 manylinux wheels, for carrying to that
machine::

    python scripts/gpu_wheels.py list               # what would be fetched
    python scripts/gpu_wheels.py download [.whl]    # fetch them (on a machine that reaches PyPI)

and there, before ``scripts/gpu_check.sh``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the GPU image ('cuda', Python 3.12) already holds: the package list read on such a
# machine on 2026-11-17. Carried wheels would only shadow these.
_IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
    typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
DEVICE_PACKAGES = frozenset(_IMAGE_PACKAGES.split())
# Carried although the image has them: the pins above need versions newer than an image may
# hold (pydantic needs typing-extensions >= 4.16), and newer ones serve the image's packages too.
ALWAYS_CARRIED = frozenset({"typing-extensions"})
PROJECT = "coupled-mamba-service"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip

# Run in a child: serve features-only on a free port, stop it once ready, and print the
# distributions of every module it imported. The server exits through os._exit (it skips
# native teardown), so the listing is hooked there.
_PROBE = textwrap.dedent(
    """
    import importlib.metadata as md, json, os, signal, sys, threading, time, urllib.request

    def dump():
        tops = {name.split(".")[0] for name in list(sys.modules)}
        owners = md.packages_distributions()
        print("DISTS " + json.dumps(sorted({d for t in tops for d in owners.get(t, ())})),
              flush=True)

    real_exit = os._exit
    os._exit = lambda code: (dump(), real_exit(code))
    port = int(sys.argv[1])

    def stop_when_ready():
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    from service.cli import main
    main(["serve", "--port", str(port), "--features-only", "--log-level", "warning"])
    """
)


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (lower case, runs of ``-_.`` as ``-``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def served_distributions(python: str = sys.executable, timeout: float = 300.0) -> set[str]:
    """The distributions a features-only ``cmamba serve`` imports, normalized."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [python, "-c", _PROBE, str(port)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("DISTS "):
            return {normalize(d) for d in json.loads(line[len("DISTS ") :])}
    raise RuntimeError(f"the probe server printed no module list:\n{done.stderr[-3000:]}")


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """name -> version pinned with ``==`` in constraints.txt (names normalized)."""
    found: dict[str, str] = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and ";" not in line:
            name, version = line.split("==", 1)
            found[normalize(name.split("[")[0])] = version.strip()
    return found


def needed(served: set[str], pinned: dict[str, str]) -> tuple[list[str], list[str]]:
    """``name==version`` for every served distribution the GPU image lacks, and the names of
    those left out for having no pin in constraints.txt: the project does not install them, so
    they were imported only because this environment happens to hold them (optional imports,
    such as FastAPI's of orjson)."""
    missing = sorted(served - (DEVICE_PACKAGES - ALWAYS_CARRIED) - {PROJECT})
    return (
        [f"{name}=={pinned[name]}" for name in missing if name in pinned],
        [name for name in missing if name not in pinned],
    )


def download(requirements: list[str], dest: Path) -> None:
    """Fetch Python 3.12 manylinux x86-64 wheels (pure-Python ones match too), no deps."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("list", "download"))
    parser.add_argument("dest", nargs="?", type=Path, default=ROOT / ".whl")
    args = parser.parse_args(argv)
    requirements, unpinned = needed(served_distributions(), pins())
    if unpinned:
        print(f"left out (not installed by the project): {', '.join(unpinned)}", file=sys.stderr)
    if args.action == "list":
        print("\n".join(requirements))
    else:
        download(requirements, args.dest)
        print(f"{len(requirements)} wheels in {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

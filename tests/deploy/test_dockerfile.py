"""The Dockerfile: hadolint, the facts the image promises, its build context and build checks."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
IMAGE_CHECK = REPO / "docker/image_check.py"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name, plus the global ARGs under ``""``."""
    by_stage: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, args in instructions(text):
        if keyword == "FROM":
            current = args.split(" AS ")[-1].strip() if " AS " in args else args
            by_stage[current] = []
        by_stage[current].append((keyword, args))
    return by_stage


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, list[tuple[str, str]]]:
    return stages(DOCKERFILE.read_text())


def global_args(parsed: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    values = {}
    for keyword, args in parsed[""]:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            values[name] = value.strip('"')
    return values


def test_hadolint_finds_nothing(tool: Callable[[str], str]) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, json.dumps(findings, indent=1)


def test_hadolint_is_the_real_linter(tool: Callable[[str], str], tmp_path: Path) -> None:
    # The same call on a Dockerfile with known faults reports them: the check above can fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [tool("hadolint"), "--format", "json", str(bad)], capture_output=True, text=True
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008", "DL3009", "DL3015"} <= codes
    assert result.returncode != 0


def test_base_images_match_the_pinned_torch(dockerfile: dict) -> None:
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    args = global_args(dockerfile)
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin
    assert args["BASE_REPO"] == "pytorch/pytorch"
    assert re.fullmatch(r"cuda\d+\.\d+-cudnn\d+", args["CUDA_FLAVOR"])
    base = "${BASE_REPO}:${TORCH_VERSION}-${CUDA_FLAVOR}"
    froms = [args for stage in dockerfile.values() for kw, args in stage if kw == "FROM"]
    assert froms == [
        f"{base}-devel AS kernels",
        f"{base}-devel AS build",
        f"{base}-runtime AS runtime",
    ]


def test_kernels_stage_compiles_pinned_kernels(dockerfile: dict) -> None:
    build = dockerfile["kernels"]
    env = " ".join(args for kw, args in build if kw == "ENV")
    assert "MAMBA_FORCE_BUILD=TRUE" in env and "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in env
    assert "SKIP_CUDA_BUILD" not in DOCKERFILE.read_text()  # the CUDA kernels are compiled
    arch = next(args for kw, args in build if kw == "ARG" and args.startswith("TORCH_CUDA_ARCH"))
    assert {"8.0", "9.0"} <= set(arch.partition("=")[2].strip('"').split(";"))
    run = " ".join(args for kw, args in build if kw == "RUN")
    assert "--no-build-isolation" in run  # compiled against the image's own torch
    assert "--no-binary causal-conv1d,mamba-ssm" in run  # from source, never a prebuilt wheel
    for package in ("mamba-ssm", "causal-conv1d"):
        version_arg = package.replace("-", "_").upper() + "_VERSION"
        default = next(a for kw, a in build if kw == "ARG" and a.startswith(version_arg + "="))
        assert re.fullmatch(r"\d+(\.\d+)+(\.post\d+)?", default.partition("=")[2])
        assert f'{package}==${{{version_arg}}}"' in run


def test_runtime_stage_is_slim_non_root_and_served_by_cmamba(dockerfile: dict) -> None:
    runtime = dockerfile["runtime"]
    keywords = [kw for kw, _ in runtime]
    assert "nvcc" not in " ".join(a for _, a in runtime)
    # The build stage's wheels are mounted for the install, never copied into a layer.
    assert not any(kw == "COPY" for kw, _ in runtime)
    mounts = runtime_mounts(runtime)
    assert {"type": "bind", "from": "build", "source": "/wheels", "target": "/tmp/wheels"} in mounts
    user = next(a for kw, a in reversed(runtime) if kw == "USER")
    uid = user.split(":")[0]
    assert uid.startswith("${") or (uid.isdigit() and int(uid) != 0)
    app_uid = next(a for kw, a in runtime if kw == "ARG" and a.startswith("APP_UID="))
    assert int(app_uid.partition("=")[2]) >= 1000
    entrypoint = json.loads(next(a for kw, a in runtime if kw == "ENTRYPOINT"))
    assert entrypoint[0].endswith("/tini") and entrypoint[1] == "--"
    command = json.loads(next(a for kw, a in runtime if kw == "CMD"))
    assert command[:2] == ["cmamba", "serve"] and "0.0.0.0" in command
    port = command[command.index("--port") + 1]
    health = next(a for kw, a in runtime if kw == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/v2/health/live" in health
    assert ("EXPOSE", port) in runtime
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")


def test_runtime_installs_around_the_base_torch_and_checks_the_result(dockerfile: dict) -> None:
    run = " ".join(a for kw, a in dockerfile["runtime"] if kw == "RUN")
    assert "image_check.py constraints" in run and "-c /tmp/constraints-image.txt" in run
    assert "image_check.py final" in run and "--kernels" in run
    env = " ".join(a for kw, a in dockerfile["runtime"] if kw == "ENV")
    assert "HF_HUB_OFFLINE=1" in env  # every model ships in the image
    assert "CMAMBA_LOG_FORMAT=json" in env  # one JSON object per log line
    assert "CMAMBA_GIT_SHA=${GIT_SHA}" in env  # cmamba_build_info names the commit


# --- the build context -----------------------------------------------------------------------


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for one context path: the last matching pattern wins.

    A pattern matches the path itself or any of its parent folders; ``*`` stays within one
    path segment, ``**`` spans any number of them, ``!`` re-includes.
    """
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
                continue
            char = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def context_sources() -> list[str]:
    """Paths the build reads from its context: COPY sources and RUN bind-mount sources."""
    sources = []
    for _stage, items in stages(DOCKERFILE.read_text()).items():
        for keyword, args in items:
            if keyword == "COPY" and not args.startswith("--from"):
                sources.extend(shlex.split(args)[:-1])
            if keyword == "RUN":
                for mount in re.findall(r"--mount=(\S+)", args):
                    options = dict(part.partition("=")[::2] for part in mount.split(","))
                    if options.get("type") == "bind" and "from" not in options:
                        sources.append(options["source"])
    return sources


def runtime_mounts(runtime: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [
        dict(part.partition("=")[::2] for part in mount.split(","))
        for keyword, args in runtime
        if keyword == "RUN"
        for mount in re.findall(r"--mount=(\S+)", args)
    ]


def test_every_copied_file_is_in_the_build_context() -> None:
    patterns = dockerignore_patterns()
    sources = context_sources()
    assert {"model", "service", "constraints.txt", "docker"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"{source}: no such file"
        files = [REPO / source] if (REPO / source).is_file() else (REPO / source).rglob("*.py")
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(relative, patterns), f"{relative} is ignored"


def test_build_context_leaves_out_local_state() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "tests/deploy/conftest.py", "runs/x/ckpt",
                 "data/mosei.pkl", ".env", "model/__pycache__/mamba.cpython-311.pyc"):  # fmt: skip
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the builder"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert dockerignore_excludes("a/b/c.pyc", ["**/*.pyc"])
    assert not dockerignore_excludes("a/b/c.py", ["**/*.pyc"])
    assert dockerignore_excludes("docs/x.md", ["*", "!model/"])
    assert not dockerignore_excludes("model/sub/x.py", ["*", "!model/"])
    assert dockerignore_excludes("model/__pycache__/x", ["*", "!model/", "**/__pycache__"])


# --- the build-time checks (docker/image_check.py) --------------------------------------------


def image_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run docker/image_check.py here; ``env`` adds variables (CMAMBA_* come only from it)."""
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("CMAMBA_")}
    return subprocess.run(
        [sys.executable, str(IMAGE_CHECK), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=REPO,
        timeout=120,
        check=False,
    )


@pytest.mark.integration  # runs docker/image_check.py in a subprocess
def test_image_constraints_keep_the_installed_torch() -> None:
    import torch

    result = image_check("constraints", str(REPO / "constraints.txt"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    torch_lines = [line for line in lines if re.match(r"torch\s*==", line)]
    assert torch_lines == [f"torch=={torch.__version__}"]
    original = (REPO / "constraints.txt").read_text().splitlines()
    others = [line for line in original if not re.match(r"(torch|triton)\s*==", line)]
    assert [line for line in lines if line in others] == others


@pytest.mark.integration  # runs docker/image_check.py in a subprocess
def test_base_check_accepts_this_interpreter_and_refuses_a_cpu_torch_for_the_gpu_image() -> None:
    import torch

    version = torch.__version__.split("+")[0]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert image_check("base", "--torch", version, "--python", python).returncode == 0
    wrong_python = image_check("base", "--torch", version, "--python", "3.99")
    assert wrong_python.returncode == 1 and "Python" in wrong_python.stderr
    if torch.version.cuda is None:
        cpu = image_check("base", "--torch", version, "--python", python, "--cuda")
        assert cpu.returncode == 1 and "not a CUDA build" in cpu.stderr


@pytest.mark.integration  # runs docker/image_check.py in a subprocess
def test_final_check_finds_every_model_offline(tiny_checkpoint: Path) -> None:
    import torch

    version = torch.__version__.split("+")[0]
    env = {"CMAMBA_MODEL_PATH": str(tiny_checkpoint), "HF_HUB_OFFLINE": "1"}
    result = image_check("final", "--torch", version, env=env)
    assert result.returncode == 0, result.stderr
    for found in ("checkpoint", "ASR model", "text model", "face mesh model"):
        assert f"ok: {found}" in result.stderr
    missing = image_check("final", "--torch", version, env={"CMAMBA_MODEL_PATH": "/nonexistent"})
    assert missing.returncode == 1 and "nonexistent" in missing.stderr


@pytest.mark.integration  # runs docker/image_check.py in a subprocess
def test_final_check_demands_the_cuda_kernels(tiny_checkpoint: Path) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("selective_scan_cuda") is not None:
        pytest.skip("mamba-ssm's kernels are installed here; the refusal cannot be shown")
    version = torch.__version__.split("+")[0]
    env = {"CMAMBA_MODEL_PATH": str(tiny_checkpoint)}
    conv = image_check("final", "--torch", version, "--kernels", env=env)
    assert conv.returncode == 1 and "causal_conv1d_cuda" in conv.stderr
    scan = image_check("final", "--torch", version, "--mamba-ssm", env=env)
    assert scan.returncode == 1 and "selective_scan_cuda" in scan.stderr


@pytest.mark.integration  # runs docker/image_check.py in a subprocess
def test_requirements_check_prints_the_projects_dependencies() -> None:
    result = image_check("requirements", str(REPO / "pyproject.toml"))
    assert result.returncode == 0, result.stderr
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert result.stdout.splitlines() == pins
    assert not any(line.startswith("coupled-mamba-service") for line in pins)


@pytest.mark.integration  # runs pip wheel in a subprocess
def test_project_wheel_carries_the_checkpoints(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The wheel the build stage makes holds every checkpoint file (the image's weights).

    Built from a copy of what the Dockerfile copies, plus one extra checkpoint folder, so the
    packaging rules are checked even before the default checkpoint exists.
    """
    import shutil
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("model", "preprocessing", "service"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    extra = source / "model/checkpoints/deploy-test"
    shutil.copytree(tiny_checkpoint, extra)
    expected = {
        path.relative_to(source).as_posix()
        for path in (source / "model/checkpoints").rglob("*")
        if path.is_file()
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("coupled_mamba_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"model/checkpoints/deploy-test/{f.name}" for f in tiny_checkpoint.iterdir()} <= names
    assert expected <= names, sorted(expected - names)


def test_files_used_through_bind_mounts_are_in_the_build_context(dockerfile: dict) -> None:
    patterns = dockerignore_patterns()
    checked = 0
    for keyword, args in dockerfile["runtime"] + dockerfile["build"]:
        if keyword != "RUN":
            continue
        for mount in re.findall(r"--mount=(\S+)", args):
            options = dict(part.partition("=")[::2] for part in mount.split(","))
            if options.get("type") != "bind" or "from" in options:
                continue
            command = re.sub(r"--mount=\S+", "", args)
            for used in re.findall(re.escape(options["target"]) + r"(/[\w./-]+)?", command):
                relative = (options["source"] + used).strip("/")
                assert (REPO / relative).is_file(), f"{relative} is used but does not exist"
                assert not dockerignore_excludes(relative, patterns), f"{relative} is ignored"
                checked += 1
    assert checked >= 4


@pytest.mark.integration  # runs docker/image_check.py in a subprocess
def test_final_check_accepts_the_embedded_default_checkpoint() -> None:
    import torch

    default = REPO / "model/checkpoints/default"
    if not (default / "config.json").is_file():
        pytest.skip("model/checkpoints/default is not in this checkout yet")
    version = torch.__version__.split("+")[0]
    result = image_check("final", "--torch", version)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("ok: checkpoint"))
    assert "checkpoints/default" in line


# --- layers, caches and the mamba-ssm build argument -------------------------------------------

SOURCE_DIRS = ("model", "preprocessing", "service")


def runs(stage: list[tuple[str, str]]) -> list[str]:
    return [args for keyword, args in stage if keyword == "RUN"]


def mounts_of(run: str) -> list[dict[str, str]]:
    return [
        dict(part.partition("=")[::2] for part in mount.split(","))
        for mount in re.findall(r"--mount=(\S+)", run)
    ]


def shell_of(run: str) -> str:
    """A RUN's command without its --mount flags (what the shell runs)."""
    return re.sub(r"--mount=\S+\s*", "", run).strip()


def test_dependencies_are_a_layer_of_their_own_before_the_source(dockerfile: dict) -> None:
    runtime = runs(dockerfile["runtime"])
    pip_runs = [i for i, run in enumerate(runtime) if "pip install" in run]
    deps, kernels, project = pip_runs
    # The dependency layer sees only the dependency files: no source, no project wheel.
    deps_sources = {m.get("source") for m in mounts_of(runtime[deps]) if m["type"] == "bind"}
    assert deps_sources == {"pyproject.toml", "constraints.txt", "docker"}
    assert not any("from" in m for m in mounts_of(runtime[deps]))
    assert "image_check.py requirements" in runtime[deps]
    assert "coupled_mamba_service" not in runtime[deps]
    # The kernels next (a source edit does not rebuild them), the project last and alone.
    assert {"type": "bind", "from": "kernels", "source": "/wheels", "target": "/tmp/kernels"} in (
        mounts_of(runtime[kernels])
    )
    assert "coupled_mamba_service" not in runtime[kernels]
    assert "coupled_mamba_service-*.whl" in runtime[project]
    assert "--no-deps" in shell_of(runtime[project]).split()
    assert deps < kernels < project
    # No stage that installs or compiles third-party code copies the project's source.
    for name in ("kernels", "runtime"):
        copied = [a for kw, a in dockerfile[name] if kw == "COPY"]
        sources = [s for args in copied for s in shlex.split(args)[:-1]]
        assert not [s for s in sources if s.split("/")[0] in SOURCE_DIRS], (name, sources)
    # The build stage copies the source only to build the project's wheel.
    build = dockerfile["build"]
    assert "pip install" not in " ".join(runs(build))
    assert all("--no-deps" in run for run in runs(build) if "pip wheel" in run)


def test_pip_keeps_its_cache_in_buildkit_cache_mounts(dockerfile: dict) -> None:
    assert DOCKERFILE.read_text().startswith("# syntax=docker/dockerfile:1")
    cache = {"type": "cache", "target": "/root/.cache/pip"}
    cached = 0
    for name, stage in dockerfile.items():
        env = " ".join(args for keyword, args in stage if keyword == "ENV")
        assert "PIP_NO_CACHE_DIR" not in env, f"{name}: the cache mounts would stay empty"
        for run in runs(stage):
            if re.search(r"pip (install|wheel)", run) and "--no-cache-dir" not in run:
                assert cache in mounts_of(run), f"{name}: pip without the cache mount: {run}"
                cached += 1
    assert cached >= 5


def run_as_the_builder(command: str, tmp_path: Path, **build_args: str) -> list[list[str]]:
    """Run a RUN's shell command with bash, build arguments as its environment (as BuildKit
    passes them) and a ``python3`` that records its arguments; returns those calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    fake = bin_dir / "python3"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **build_args},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_mamba_ssm_is_compiled_and_checked_only_with_its_build_argument(
    dockerfile: dict, tmp_path: Path
) -> None:
    args = global_args(dockerfile)
    assert args["MAMBA_SSM"] == "0"  # the default checkpoint is coupled: mamba-ssm cannot serve it
    (compile_run,) = [run for run in runs(dockerfile["kernels"]) if "pip wheel" in run]
    versions = {"MAMBA_SSM_VERSION": "2.3.2.post1", "CAUSAL_CONV1D_VERSION": "1.7.0"}

    (off,) = run_as_the_builder(shell_of(compile_run), tmp_path, MAMBA_SSM="0", **versions)
    assert "causal-conv1d==1.7.0" in off and not any("mamba-ssm==" in a for a in off)
    (on,) = run_as_the_builder(shell_of(compile_run), tmp_path, MAMBA_SSM="1", **versions)
    assert {"causal-conv1d==1.7.0", "mamba-ssm==2.3.2.post1"} <= set(on)
    with pytest.raises(RuntimeError, match="MAMBA_SSM must be 0 or 1"):
        run_as_the_builder(shell_of(compile_run), tmp_path, MAMBA_SSM="yes", **versions)

    final_run = runs(dockerfile["runtime"])[-2]  # the last RUN makes the user
    assert "image_check.py final" in final_run
    for value, expected in (("0", False), ("1", True)):
        calls = run_as_the_builder(
            shell_of(final_run), tmp_path, MAMBA_SSM=value, TORCH_VERSION="2.13.0"
        )
        (check,) = [call for call in calls if "final" in call]
        assert "--kernels" in check  # causal-conv1d serves every checkpoint's conv
        assert ("--mamba-ssm" in check) is expected
    # Each stage that reads the argument declares it (else it is empty there).
    for name in ("kernels", "runtime"):
        assert ("ARG", "MAMBA_SSM") in dockerfile[name], name

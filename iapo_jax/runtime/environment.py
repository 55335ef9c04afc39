"""Facts a rerun needs: code version, package versions, Python, host, hardware and JAX runtime.

Every collector is defensive: a missing git, an uninstalled package or an unusual platform yields
None fields, never an exception, because a run record must always be writable.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

DISTRIBUTION = "iapo-jax"
# Used when the package is run from a source tree without being installed.
_FALLBACK_PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "transformers",
    "safetensors", "gguf", "tokenizers", "tyro", "pyyaml", "tqdm", "scipy", "grain",
    "tensorflow-datasets", "tensorboardx",
)
# Runtime pieces that are not declared dependencies but change numbers or speed.
_RUNTIME_PACKAGES = ("jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                     "jax-cuda13-plugin", "jax-cuda13-pjrt", "torch")
# Environment variables that change numerics or device layout (values recorded verbatim).
_ENV_PREFIXES = ("XLA_", "JAX_", "TPU_", "IAPO_", "LIBTPU_", "CUDA_VISIBLE", "NCCL_")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def package_root() -> Path:
    """The folder that contains the ``iapo_jax`` package (a repository root for source installs)."""
    return Path(__file__).resolve().parents[2]


def _git(root: Path, *args: str) -> bytes | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _sha256_file(path: Path, digest: "hashlib._Hash") -> None:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def source_sha256() -> str:
    """sha256 over every .py file of the installed ``iapo_jax`` package (names and contents).

    Identifies the code even without git, e.g. for a wheel installed on a TPU worker.
    """
    pkg = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(str(path.relative_to(pkg)).encode() + b"\0")
        _sha256_file(path, digest)
    return digest.hexdigest()


def git_state(root: Path | None = None) -> dict[str, Any] | None:
    """Commit, dirtiness and a hash of uncommitted changes of the repository holding the package.

    Returns None when the package does not live at the top of a git work tree (for example when it
    is installed into site-packages). ``diff_sha256`` hashes ``git diff HEAD`` plus the names and
    contents of untracked files, so two trees with the same commit and hash hold the same code.
    """
    root = root or package_root()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.decode().strip()).resolve() != root.resolve():
        return None
    head = _git(root, "rev-parse", "--verify", "HEAD")
    commit = head.decode().strip() if head else None
    status = _git(root, "status", "--porcelain") or b""
    # Before the first commit there is no HEAD: diff against the empty tree instead.
    base = commit or "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    digest = hashlib.sha256(_git(root, "diff", base, "--binary") or b"")
    untracked = (_git(root, "ls-files", "--others", "--exclude-standard", "-z") or b"").split(b"\0")
    for name in sorted(n for n in untracked if n):
        path = root / name.decode("utf-8", errors="replace")
        digest.update(b"untracked\0" + name + b"\0")
        if path.is_file():
            _sha256_file(path, digest)
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "commit": commit,
        "branch": branch.decode().strip() if branch and commit else None,
        "dirty": bool(status.strip()),
        "diff_sha256": digest.hexdigest(),
    }


def code_version() -> dict[str, Any]:
    """Package version, source hash and git state of the code that is running."""
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = None
    return {"package_version": version, "source_sha256": source_sha256(), "git": git_state()}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]


def package_versions() -> dict[str, str]:
    """Installed versions of the project's declared dependencies and of the JAX runtime pieces."""
    try:
        names = [_requirement_name(r) for r in metadata.requires(DISTRIBUTION) or []]
    except metadata.PackageNotFoundError:
        names = list(_FALLBACK_PACKAGES)
    versions = {}
    for name in sorted(set(names) | set(_RUNTIME_PACKAGES), key=str.lower):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host_facts() -> dict[str, Any]:
    """Host name, OS, CPU model and count, memory, and numerics-relevant environment variables."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    env = {
        k: v for k, v in sorted(os.environ.items())
        if k.startswith(_ENV_PREFIXES) and not any(w in k for w in _SECRET_WORDS)
    }
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "env": env,
    }


def python_facts() -> dict[str, Any]:
    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable}


def jax_facts() -> dict[str, Any]:
    """Backend, device kinds and counts, process count. Initialises the JAX backend if needed."""
    import jax

    devices = jax.devices()
    return {
        "version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": sorted({d.device_kind for d in devices}),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "x64": bool(jax.config.jax_enable_x64),
    }


def machine_signature(record: dict[str, Any]) -> dict[str, Any]:
    """What must match for two runs to be expected to give bit-identical numbers."""
    jax_info = record.get("jax") or {}
    host = record.get("host") or {}
    return {
        "backend": jax_info.get("backend"),
        "device_kind": jax_info.get("device_kind"),
        "device_count": jax_info.get("device_count"),
        "process_count": jax_info.get("process_count"),
        "cpu_model": host.get("cpu_model"),
        "jax": jax_info.get("version"),
        "x64": jax_info.get("x64"),
    }

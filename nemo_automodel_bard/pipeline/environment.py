"""What a pipeline run depends on besides its configuration: numerics, library versions, our own code.

The tiny pipeline amplifies tiny numerical differences (a different thread count or CPU kernel changes
the loss in the fifth digit at step 0 and the final models visibly), so a run pins its thread count
(:func:`pin_threads`), records its environment in the report (:func:`environment`), and every stage
fingerprint covers the code that produced the stage (:func:`code_digest`) and the numerics
(:func:`numerics`): a changed recipe, library or machine never silently reuses an old stage.

Example:
    >>> from nemo_automodel_bard.pipeline.environment import code_digest, derive_seed
    >>> len(code_digest(TRAINING_CODE))
    16
    >>> derive_seed(0, "pbm_b4") == derive_seed(0, "pbm_b4") != derive_seed(1, "pbm_b4")
    True
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: inside an installed wheel: the copies of the repository's ``conf/`` and ``recipes/``
WHEEL_RESOURCES = PACKAGE_DIR / "_resources"


def resource_root() -> Path:
    """The directory holding ``conf/`` (the pipeline's config tree) and ``recipes/`` (the recipe YAMLs): the
    source checkout the package lives in, else the copies an installed wheel carries."""
    checkout = PACKAGE_DIR.parent
    if (checkout / "conf" / "config.yaml").is_file() and (checkout / "recipes").is_dir():
        return checkout
    return WHEEL_RESOURCES


def config_dir() -> Path:
    """The Hydra config tree: ``$BARD_VL_CONF``, else ``conf/`` of :func:`resource_root`."""
    for candidate in (os.environ.get("BARD_VL_CONF"), resource_root() / "conf"):
        if candidate and (Path(candidate) / "config.yaml").exists():
            return Path(candidate)
    raise FileNotFoundError(f"bard-vl: cannot find the conf/ directory (looked in {resource_root()}); set BARD_VL_CONF")

#: the parts of the package that produce a trained stage (data, objectives, model, recipes)
TRAINING_CODE = ("__init__.py", "_alias.py", "models", "diffusion", "objectives", "data", "fixtures", "recipes")
#: ... and what additionally produces an evaluation result
EVALUATION_CODE = TRAINING_CODE + ("decoding", "pipeline/evaluate.py")

#: a run seed's training streams live in disjoint index ranges of the procedural task
STREAM_STRIDE = 2**24  # samples per stream (16.7 M)
STREAM_SLOTS = 2**20  # streams per run seed


@functools.lru_cache(maxsize=None)
def _digest_of(parts: tuple[str, ...]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        root = PACKAGE_DIR / part
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            if "__pycache__" in path.parts or not path.is_file():
                continue
            h.update(str(path.relative_to(PACKAGE_DIR)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def code_digest(parts: Iterable[str] = TRAINING_CODE) -> str:
    """A 16-hex-digit hash of the package source files under ``parts`` (paths relative to the package)."""
    return _digest_of(tuple(parts))


def file_digest(path: str | os.PathLike) -> str:
    """A 16-hex-digit hash of one file's bytes (e.g. a recipe YAML)."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=8).hexdigest()


def derive_seed(run_seed: int, stream: str) -> int:
    """A 31-bit seed for one stream (``"ar_pretrain"``, ``"pbm_b4"``, ...) of run seed ``run_seed``."""
    digest = hashlib.blake2b(f"seed/{int(run_seed)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def stream_offset(run_seed: int, stream: str) -> int:
    """First task index of a training stream: every (run seed, stream) gets its own range of
    :data:`STREAM_STRIDE` samples of the procedural task, so no two stages or seeds share an image."""
    if int(run_seed) < 0:
        raise ValueError(f"seed must be >= 0, got {run_seed}")
    slot = int.from_bytes(hashlib.blake2b(f"slot/{stream}".encode(), digest_size=8).digest(), "little") % STREAM_SLOTS
    return (int(run_seed) * STREAM_SLOTS + slot) * STREAM_STRIDE


def pin_threads(threads: Optional[int]) -> Optional[int]:
    """Set torch's intra-op thread count (and ``OMP_NUM_THREADS`` for child processes); ``None``: keep."""
    if threads is None:
        return None
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or null, got {threads}")
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    return threads


def numerics() -> dict[str, Any]:
    """The settings a CPU run's floating-point results depend on (part of every stage fingerprint)."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - older torch
        out["cpu_capability"] = "unknown"
    from importlib.metadata import PackageNotFoundError, version

    # installed distribution versions (nemo_automodel.__version__ appends the git commit of the working
    # directory, which would tie every fingerprint to the current commit)
    for key, dist in (("transformers", "transformers"), ("nemo_automodel", "nemo-automodel"), ("PIL", "pillow")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:  # pragma: no cover
            out[key] = None
    return out


def _git_commit() -> Optional[str]:
    try:
        result = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PACKAGE_DIR, capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE_DIR,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Everything worth recording about the machine and software of a run (for the report)."""
    import torch

    env = numerics()
    env.update(
        python=platform.python_version(),
        machine=platform.machine(),
        processor=platform.processor() or None,
        cpu_count=os.cpu_count(),
        cuda=torch.cuda.is_available(),
        commit=_git_commit(),
        training_code=code_digest(TRAINING_CODE),
        evaluation_code=code_digest(EVALUATION_CODE),
    )
    return env


__all__ = [
    "EVALUATION_CODE",
    "TRAINING_CODE",
    "config_dir",
    "resource_root",
    "code_digest",
    "derive_seed",
    "environment",
    "file_digest",
    "numerics",
    "pin_threads",
    "stream_offset",
]

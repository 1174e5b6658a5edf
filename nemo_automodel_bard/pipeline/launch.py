"""Run a NeMo recipe YAML with ``--key=value`` overrides: in a fresh process, in this one, or through ``torchrun``.

One process (``launcher=local``, the tiny pipeline): each stage in a fresh Python process
(:mod:`.stage_process`; ``launcher.isolate: false`` runs it in the pipeline's own process instead, which saves
the start-up but trains later stages slower). Several processes (or nodes) go through ``torchrun -m
nemo_automodel.cli.app``, which works on CPU (gloo) and GPU alike.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)


def format_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """``{"a.b": 1, "c": [1, 2], "d": ["x*"]}`` -> ``["--a.b=1", "--c=[1, 2]", "--d=['x*']"]`` (NeMo's CLI override
    syntax: a value is read with ``ast.literal_eval``, so the strings of a list are quoted, e.g. the LoRA target
    module patterns)."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = "[" + ", ".join(repr(v) if isinstance(v, str) else str(v) for v in value) + "]"
        elif value is None:
            value = "None"
        out.append(f"--{key}={value}")
    return out


def run_in_process(yaml_path: str | Path, overrides: Mapping[str, Any]) -> None:
    """Build and run the recipe named by the YAML in this process (single rank)."""
    from nemo_automodel_bard.recipes.common import run_recipe as run_recipe_in_process

    run_recipe_in_process(yaml_path, format_overrides(overrides))


def stage_process_command(yaml_path: str | Path, overrides: Mapping[str, Any]) -> list[str]:
    """The command line of one stage in a fresh process (:mod:`nemo_automodel_bard.pipeline.stage_process`)."""
    return [sys.executable, "-m", "nemo_automodel_bard.pipeline.stage_process", str(yaml_path),
            *format_overrides(overrides)]


def torchrun_command(yaml_path: str | Path, overrides: Mapping[str, Any], launcher: Mapping[str, Any]) -> list[str]:
    """The ``torchrun ... -m nemo_automodel.cli.app`` command line for a stage."""
    nproc = int(launcher.get("nproc_per_node", 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    nnodes = int(launcher.get("nnodes", 1) or 1)
    if nnodes > 1:
        endpoint = launcher.get("rdzv_endpoint")
        if not endpoint:
            raise ValueError("launcher.nnodes > 1 needs launcher.rdzv_endpoint (host:port of the first node)")
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
    else:
        cmd += ["--standalone"]
    cmd += list(launcher.get("extra_args", []) or [])
    cmd += ["-m", "nemo_automodel.cli.app", str(yaml_path), *format_overrides(overrides)]
    return cmd


def run_recipe(yaml_path: str | Path, overrides: Mapping[str, Any], launcher: Mapping[str, Any], log_file: Path) -> None:
    """Run one training stage; raise ``RuntimeError`` naming the log file if it fails."""
    yaml_path = Path(yaml_path)
    if not yaml_path.exists():
        raise FileNotFoundError(f"recipe YAML not found: {yaml_path}")
    kind = launcher.get("kind", "local")
    nproc = int(launcher.get("nproc_per_node", 1))
    if kind == "local" and nproc == 1:
        if not launcher.get("isolate", True):
            logger.info("running %s in-process", yaml_path)
            run_in_process(yaml_path, overrides)
            return
        cmd = stage_process_command(yaml_path, overrides)
        logger.info("running %s in a fresh process", yaml_path)
        result = subprocess.run(cmd)  # its output goes to this console, as an in-process stage's would
        if result.returncode != 0:
            raise RuntimeError(f"stage failed (exit {result.returncode}): {shlex.join(cmd)}; see the output above")
        return
    cmd = torchrun_command(yaml_path, overrides, launcher)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logger.info("running %s (log: %s)", shlex.join(cmd), log_file)
    with open(log_file, "a") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"stage failed (exit {result.returncode}): {shlex.join(cmd)}; see {log_file}")


__all__ = ["format_overrides", "run_in_process", "run_recipe", "stage_process_command", "torchrun_command"]

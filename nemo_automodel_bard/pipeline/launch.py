"""Run a NeMo recipe YAML with ``--key=value`` overrides: in a fresh process, in this one, or through ``torchrun``.

One process (``launcher=local``, the tiny pipeline): each stage in a fresh Python process
(:mod:`.stage_process`; ``launcher.isolate: false`` runs it in the pipeline's own process instead, which saves
the start-up but trains later stages slower). Several processes (or nodes) go through ``torchrun -m
nemo_automodel.cli.app``, which works on CPU (gloo) and GPU alike.

Signals: while a stage process runs, the pipeline forwards SIGTERM and SIGINT to it (the stage process, or
torchrun, which passes the signal on to its workers and waits for them), waits for it to checkpoint and exit, and
raises :class:`StageStopped`. The stage listens to both signals (``step_scheduler.preemption_signal``), so it ends
its current step, checkpoints it and exits. A second signal kills a local stage process at once (torchrun gets
only the first one: a second would cut its own shutdown of the workers short). On Linux a stage process is also
sent SIGTERM if the pipeline process dies without forwarding anything (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import logging
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

from nemo_automodel_bard.recipes.stop_signals import STOP_SIGNALS, stop_signal_override

logger = logging.getLogger(__name__)



class StageStopped(Exception):
    """A training stage ended because of a stop signal (it checkpointed, if it got as far as its training loop).

    ``signal``: the signal's number (the one the pipeline received and forwarded, or the one the stage says stopped
    it); ``returncode``: the stage process's exit status (``None`` for a stage run in this process)."""

    def __init__(self, signum: int, returncode: Optional[int] = None) -> None:
        self.signal = int(signum)
        self.returncode = returncode
        super().__init__(f"stage stopped by {signal.Signals(self.signal).name} (exit status {returncode})")


def stop_signal_of(returncode: int) -> Optional[int]:
    """The stop signal an exit status reports (``-N``: killed by it; ``128 + N``: exited after handling it), else
    ``None``."""
    for sig in STOP_SIGNALS:
        if returncode in (-int(sig), 128 + int(sig)):
            return int(sig)
    return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: ask the kernel to send this (child) process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def run_stage_command(cmd: list[str], *, torchrun: bool = False, **popen_kwargs: Any) -> tuple[int, Optional[int]]:
    """Run a stage's command line to its end, forwarding :data:`STOP_SIGNALS` to it; return ``(exit status, the
    first signal forwarded or None)``.

    The first signal is passed on as it is and the call waits for the stage to checkpoint and exit; a second one
    kills a local stage process (``torchrun=False``) with SIGKILL, while torchrun (``torchrun=True``) keeps only
    the first: its own handler would cut its shutdown of the workers short. Handlers are installed only in the
    main thread (elsewhere the signal cannot reach Python code) and restored afterwards."""
    received: list[int] = []
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                             **popen_kwargs)

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if child.poll() is not None:
            return
        if len(received) == 1:
            print(f"[bard-vl] {name} received: passed on to the stage (pid {child.pid}); waiting for it to "
                  "checkpoint and stop", file=sys.stderr, flush=True)
            child.send_signal(signum)
        elif not torchrun:
            print(f"[bard-vl] {name} received again: killing the stage (pid {child.pid})", file=sys.stderr,
                  flush=True)
            child.kill()
        else:
            print(f"[bard-vl] {name} received again: torchrun is already stopping its workers, waiting for it",
                  file=sys.stderr, flush=True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    try:
        returncode = child.wait()
    except BaseException:  # this process is going down: stop the stage the clean way first (torchrun stops its ranks)
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, (received[0] if received else None)


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

    runner = run_recipe_in_process(yaml_path, format_overrides(overrides), install_signal_handler=True)
    if getattr(runner, "stop_signal", None) is not None:
        raise StageStopped(runner.stop_signal)


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
    if not any(key == "step_scheduler.preemption_signal" for key in overrides):  # every rank stops on both signals
        cmd.append(stop_signal_override())
    return cmd


def run_recipe(yaml_path: str | Path, overrides: Mapping[str, Any], launcher: Mapping[str, Any], log_file: Path) -> None:
    """Run one training stage; raise :class:`StageStopped` if a stop signal ended it (forwarded by this process, or
    sent to the stage directly), ``RuntimeError`` naming the log file if it fails."""
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
        # its output goes to this console, as an in-process stage's would
        returncode, forwarded = run_stage_command(cmd)
        _check_exit(returncode, forwarded, cmd, "see the output above")
        return
    cmd = torchrun_command(yaml_path, overrides, launcher)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logger.info("running %s (log: %s)", shlex.join(cmd), log_file)
    with open(log_file, "a") as log:
        returncode, forwarded = run_stage_command(cmd, torchrun=True, stdout=log, stderr=subprocess.STDOUT)
    _check_exit(returncode, forwarded, cmd, f"see {log_file}")


def _check_exit(returncode: int, forwarded: Optional[int], cmd: list[str], where: str) -> None:
    """Raise :class:`StageStopped` for a stage a stop signal ended, ``RuntimeError`` for one that failed."""
    if forwarded is not None:
        raise StageStopped(forwarded, returncode)
    stopped = stop_signal_of(returncode)
    if stopped is not None:  # the stage alone was signalled (e.g. by a scheduler)
        raise StageStopped(stopped, returncode)
    if returncode != 0:
        raise RuntimeError(f"stage failed (exit {returncode}): {shlex.join(cmd)}; {where}")


__all__ = ["STOP_SIGNALS", "StageStopped", "format_overrides", "run_in_process", "run_recipe", "run_stage_command",
           "stage_process_command", "stop_signal_of", "torchrun_command"]

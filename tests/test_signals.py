"""Schedulers' signals: SIGTERM to ``bard-vl`` during a training stage is passed on to the stage, which checkpoints
and exits; the pipeline exits with 143 naming the stage and the checkpoint, leaves no process behind, and the same
command resumes from that checkpoint and finishes.

The whole-pipeline test sends a real SIGTERM (``os.kill``) to a real ``bard-vl`` process training the tiny AR model
on the shapes task; the unit tests check the launcher's forwarding and exit-status rules on small child processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nemo_automodel_bard.pipeline.launch import StageStopped, _check_exit, run_stage_command, stop_signal_of

ROOT = Path(__file__).resolve().parents[1]

#: a stage that sleeps and reports the signal it got: exit 128 + N after handling signal N
_SLEEPER = """
import signal, sys, time
def stop(signum, frame):
    print("child got", signum, flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(60)
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of a process from ``/proc`` (Linux), ``None`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[1]
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _still_running(pids, timeout=10.0) -> list[int]:
    """The processes of ``pids`` still running (zombies count as gone) after up to ``timeout`` seconds."""
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        alive = [p for p in alive if (stat := _stat(p)) is not None and stat[0] != "Z"]
        time.sleep(0.1)
    return alive


def test_exit_statuses_that_mean_a_stop():
    assert stop_signal_of(143) == signal.SIGTERM and stop_signal_of(-15) == signal.SIGTERM
    assert stop_signal_of(130) == signal.SIGINT and stop_signal_of(-2) == signal.SIGINT
    assert stop_signal_of(0) is None and stop_signal_of(1) is None and stop_signal_of(-9) is None
    with pytest.raises(StageStopped) as info:
        _check_exit(143, None, ["x"], "")
    assert info.value.signal == signal.SIGTERM
    with pytest.raises(RuntimeError, match="exit 1"):
        _check_exit(1, None, ["x"], "see the log")
    _check_exit(0, None, ["x"], "")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_this_process_is_forwarded_to_the_stage(sig):
    """The launcher, in the main thread, passes the signal it gets on to the running stage and returns its status."""
    timer = threading.Timer(1.5, os.kill, (os.getpid(), sig))
    timer.start()
    before = signal.getsignal(sig)
    try:
        status, forwarded = run_stage_command([sys.executable, "-c", _SLEEPER], stdout=subprocess.PIPE, text=True)
    finally:
        timer.cancel()
    assert forwarded == sig and status == 128 + sig
    assert signal.getsignal(sig) is before  # the previous handler is back


def _logged_steps(text: str) -> int:
    """How many ``[ar] step N |`` lines a training log holds."""
    return len(re.findall(r"\[ar\] step \d+ \|", text))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
@pytest.mark.parametrize("launcher", ["local", "torchrun"])
def test_sigterm_to_the_pipeline_stops_the_stage_and_the_same_command_resumes(tmp_path, launcher):
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "nemo_automodel_bard.cli", f"work_dir={work}", f"hydra.run.dir={tmp_path / 'hydra'}",
           "data=shapes", "stages=[ar_pretrain]", "ar_pretrain.max_steps=40", "ar_pretrain.vision_warmup_steps=0",
           "threads=1", "++ar_pretrain.overrides={step_scheduler.global_batch_size: 2, step_scheduler.local_batch_size: 2,"
           " step_scheduler.ckpt_every_steps: 1000, step_scheduler.val_every_steps: 1000, bard.progress_bar: false}"]
    if launcher == "torchrun":
        cmd += ["launcher=torchrun", "launcher.nproc_per_node=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pipeline = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(pipeline.stdout), daemon=True)
    reader.start()

    def training_log() -> str:  # a local stage logs to the pipeline's console, torchrun's ranks to launch.log
        if launcher == "local":
            return "".join(lines)
        logs = list(work.glob("ar_pretrain-*/launch.log"))
        return logs[0].read_text(errors="replace") if logs else ""

    stage_pids: list[int] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _logged_steps(training_log()) < 3:
            assert pipeline.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.1)
        assert _logged_steps(training_log()) >= 3, "no training step logged within 300 s"
        stage_pids = _descendants(pipeline.pid)
        assert stage_pids, "the training stage runs in a process of its own"
        os.kill(pipeline.pid, signal.SIGTERM)
        status = pipeline.wait(timeout=120)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    reader.join(timeout=10)
    log = "".join(lines)
    assert status == 128 + signal.SIGTERM, log[-3000:]
    assert not _still_running(stage_pids), "a stage process outlived the pipeline"

    # the stage checkpointed the step it was in and said so; the pipeline named the stage and the checkpoint
    run_dir = next(work.glob("ar_pretrain-*"))
    marker = json.loads((run_dir / "stopped.json").read_text())
    assert marker["signal"] == "SIGTERM" and 3 <= marker["steps"] < 40, marker
    checkpoint = Path(marker["checkpoint"])
    assert checkpoint.name == f"epoch_0_step_{marker['steps'] - 1}" and checkpoint.is_dir()
    assert not (run_dir / "final").exists()
    logged = [json.loads(line)["step"] for line in (run_dir / "training.jsonl").read_text().splitlines()]
    assert logged == list(range(marker["steps"]))
    assert f"stage ar_pretrain stopped by SIGTERM; checkpoint {checkpoint}" in log, log[-3000:]

    # the same command: resumes at that checkpoint and finishes the remaining steps
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert not (run_dir / "stopped.json").exists()
    logged = [json.loads(line)["step"] for line in (run_dir / "training.jsonl").read_text().splitlines()]
    assert logged == list(range(40))  # each step once: the resumed run started after the checkpoint
    assert (run_dir / "final" / "config.json").is_file()
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["stages"]["ar_pretrain"]["status"] == "done"

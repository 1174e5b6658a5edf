"""What "stopping a training run on a signal" means, in one place (light: no torch or NeMo import).

The recipes (:mod:`.common`) stop on these signals and write the marker; the pipeline's launcher forwards them to
its stage processes and reads the marker to say where a stopped stage can resume.
"""

from __future__ import annotations

import signal

#: the signals that stop a training run cleanly (a checkpoint, then exit): a scheduler's and a terminal's
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: written into ``checkpoint_dir`` by a run that a signal stopped (signal, step, checkpoint); removed by the next run
STOP_MARKER = "stopped.json"


def stop_signal_override() -> str:
    """The recipe override that makes NeMo's step scheduler stop cleanly on every one of :data:`STOP_SIGNALS`."""
    return f"--step_scheduler.preemption_signal=[{', '.join(str(int(s)) for s in STOP_SIGNALS)}]"


__all__ = ["STOP_MARKER", "STOP_SIGNALS", "stop_signal_override"]

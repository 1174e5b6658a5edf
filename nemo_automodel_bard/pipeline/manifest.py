"""The pipeline manifest: what each stage produced, so a re-run skips finished stages.

Stored as ``<work_dir>/manifest.json`` and written atomically (temp file + ``os.replace``). A stage
entry is reused only when its configuration fingerprint matches and its outputs still exist. Paths inside the
work directory are stored relative to it (``{work_dir}/...``), and fingerprints see them the same way
(:meth:`Manifest.portable`), so a moved or copied work directory keeps every finished stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any


def fingerprint(value: Any) -> str:
    """Stable short hash of a JSON-serialisable stage configuration."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


#: how the work directory is written in the stored manifest and in fingerprints
WORK_DIR_TOKEN = "{work_dir}"


def _map_strings(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every string in it (dict keys included)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {(fn(k) if isinstance(k, str) else k): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


class Manifest:
    """Records stage results in ``<work_dir>/manifest.json``."""

    def __init__(self, work_dir: str | Path) -> None:
        self.path = Path(work_dir) / "manifest.json"
        self.root = str(Path(work_dir).resolve())
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text()).get("stages", {})
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path} is not valid JSON ({exc}); delete it to rebuild every stage") from exc
            self.entries = _map_strings(stored, lambda text: text.replace(WORK_DIR_TOKEN, self.root))

    def portable(self, value: Any) -> Any:
        """``value`` (any JSON-like structure) with every path inside the work directory written relative to it,
        as ``{work_dir}/...``: what fingerprints and the stored manifest see."""
        inside = re.compile(re.escape(self.root.rstrip("/")) + r"(?=/|:|$)")  # the directory itself or below it
        return _map_strings(value, lambda text: inside.sub(WORK_DIR_TOKEN, text))

    def finished(self, stage_id: str, config_hash: str) -> dict[str, Any] | None:
        """The recorded outputs if ``stage_id`` finished with this configuration and they still exist."""
        entry = self.entries.get(stage_id)
        if not entry or entry.get("status") != "done" or entry.get("config_hash") != config_hash:
            return None
        for key, value in entry.get("outputs", {}).items():
            if key.endswith(("_dir", "_path", "_file")) and not Path(str(value)).exists():
                return None
        return entry["outputs"]

    def record(self, stage_id: str, config_hash: str, outputs: dict[str, Any], seconds: float) -> None:
        """Mark ``stage_id`` done with its outputs and persist the manifest atomically."""
        self.entries[stage_id] = {
            "status": "done",
            "config_hash": config_hash,
            "outputs": outputs,
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._write()

    def mark_started(self, stage_id: str, config_hash: str) -> None:
        """Record that a stage is running (an interrupted one is resumed by the next run)."""
        previous = self.entries.get(stage_id, {})
        if previous.get("status") == "done" and previous.get("config_hash") == config_hash:
            return
        self.entries[stage_id] = {"status": "running", "config_hash": config_hash,
                                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"stages": self.portable(self.entries)}, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


__all__ = ["Manifest", "WORK_DIR_TOKEN", "fingerprint"]

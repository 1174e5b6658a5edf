"""``bard-vl --help``: the stages, the config groups and the pipeline's keys with their defaults.

Built from the config tree itself (``conf/config.yaml`` and the group directories) and the stage functions'
docstrings, so it cannot drift from them; it reads YAML only (no torch, no Hydra), so it answers at once.
The meaning of every key is in docs/pipeline.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .environment import config_dir

__all__ = ["pipeline_help"]


def _load(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _keys(section: str, body: dict[str, Any]) -> list[str]:
    """``section.key=value`` for each key of a section (a dict value stays one value: ``{4: 200}``)."""
    return [f"{section}.{key}={value}" for key, value in body.items()]


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring, on one line."""
    text = " ".join((doc or "").split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _wrap(items: list[str], indent: str, width: int = 110) -> list[str]:
    lines, line = [], indent
    for item in items:
        if len(line) + len(item) + 2 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += item + "  "
    if line.strip():
        lines.append(line.rstrip())
    return lines


def pipeline_help(conf: Path | None = None) -> str:
    """The help text of the pipeline for the config tree ``conf`` (default: the one ``bard-vl`` uses)."""
    from .stages import STAGE_ORDER, STAGES

    conf = Path(conf) if conf is not None else config_dir()
    config = _load(conf / "config.yaml")
    defaults = {}
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            defaults.update(entry)
    lines = [f"pipeline stages (stages=[...], run in this order; default: {config.get('stages')}):"]
    for name in STAGE_ORDER:
        lines.append(f"  {name:<13} {_summary(STAGES[name].__doc__)}")
    lines += ["", "config groups (GROUP=OPTION):"]
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir()):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        marked = [f"{o} (default)" if o == defaults.get(group) else o for o in options]
        lines.append(f"  {group:<9} " + " | ".join(marked))
    lines += ["", "keys and their defaults (KEY=VALUE, +KEY=VALUE to add one; meaning: docs/pipeline.md):"]
    top = [f"{k}={v}" for k, v in config.items() if k not in ("defaults", "hydra") and not isinstance(v, dict)]
    lines += _wrap(top, "  ")
    for section, body in config.items():
        if isinstance(body, dict) and section != "hydra":
            lines += _wrap(_keys(section, body), "  ")
    for group in ("model", "data", "peft"):
        name = defaults.get(group)
        if name and (conf / group / f"{name}.yaml").is_file():
            body = _load(conf / group / f"{name}.yaml")
            if group in body and isinstance(body[group], dict):  # a @package _global_ file
                body = body[group]
            lines += _wrap(_keys(group, body), "  ")
    lines += ["", "examples:", "  bard-vl                                   # the main job: shipped tiny parents, census task",
              "  bard-vl data=shapes                       # the quick shapes run (pre-trains its own AR model)",
              "  bard-vl seed=1 pbm.max_steps=100          # another seed, shorter PBM stages",
              "  bard-vl model=qwen3_vl_4b data=jsonl data.path=/data/train.jsonl launcher=torchrun",
              "  bard-vl --multirun seed=0,1,2             # seeds, then multirun/aggregate.md",
              "  bard-vl --cfg job                         # the resolved config (Hydra); --hydra-help: Hydra's flags"]
    return "\n".join(lines)

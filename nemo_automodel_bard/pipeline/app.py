"""``bard-vl`` Hydra application: chains AR pre-training, AR init, PBM, SWD, evaluation and report.

Config tree: ``conf/`` (groups ``model``, ``data``, ``launcher``). Outputs go under ``work_dir``
(``runs/<model>-<data>`` by default) with ``manifest.json`` recording what each stage produced, so
running the same command again skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from .environment import config_dir, environment, pin_threads, resource_root
from .manifest import Manifest
from .stages import STAGE_ORDER, STAGES, Context, PipelineStopped
from .validate import PipelineConfigError, validate_config

logger = logging.getLogger(__name__)

#: relative ``model.recipe_dir`` paths resolve here (the checkout, or the wheel's copy of ``recipes/``)
REPO_ROOT = resource_root()


def run_pipeline(cfg: DictConfig | dict[str, Any], output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured stages; return every stage's outputs (also usable without Hydra)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    work_dir = Path(plain["work_dir"])
    if not work_dir.is_absolute():
        work_dir = Path.cwd() / work_dir
    manifest = Manifest(work_dir)
    recorded = {name[len("stage:"):] for name, e in manifest.entries.items()
                if name.startswith("stage:") and e.get("status") == "done"}
    validate_config(plain, REPO_ROOT, recorded)
    # numerics are part of what a run is: set, not inherited (stage fingerprints record them)
    pin_threads(plain.get("threads"))
    ctx = Context(cfg=plain, work_dir=work_dir, output_dir=Path(output_dir or work_dir), repo_root=REPO_ROOT,
                  manifest=manifest)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "seed": ctx.seed, "data_seed": plain.get("data", {}).get("seed")}
    (ctx.output_dir / "environment.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    for name in STAGE_ORDER:
        if name in plain["stages"]:
            outputs = STAGES[name](ctx)
            manifest.record(f"stage:{name}", "latest", outputs, 0.0)
            ctx.outputs[name] = outputs
        elif name in recorded:
            ctx.outputs[name] = manifest.entries[f"stage:{name}"]["outputs"]
    return ctx.outputs


def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_pipeline(cfg, output_dir)
    except PipelineConfigError as exc:
        print(f"bard-vl: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except PipelineStopped as exc:  # a scheduler's SIGTERM or a Ctrl-C during a training stage
        logger.warning("%s", exc)
        print(f"bard-vl: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None


def main() -> None:
    """Console entry point (``bard-vl`` with Hydra overrides)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hydra.main(version_base=None, config_path=str(config_dir()), config_name="config")(_hydra_main)()


__all__ = ["config_dir", "main", "run_pipeline"]

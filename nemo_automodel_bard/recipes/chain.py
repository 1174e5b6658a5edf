"""Chained PBM: AR init, then PBM stages B = 2 -> 4 -> 8 -> 16 -> 32, each from the previous export.

One command for the tiny (CPU) setting::

    python -m nemo_automodel_bard.recipes.chain                      # AR init + 5 PBM stages
    python -m nemo_automodel_bard.recipes.chain --ar-pretrain        # AR pre-training first
    bash scripts/pbm_chain_tiny.sh --nproc-per-node 2                # the same through the script

Each stage runs ``<config-dir>/pbm_b{B}.yaml`` with ``torchrun --standalone --nproc-per-node=N -m
nemo_automodel.cli.app`` (``--launcher inprocess`` runs it in this process instead), overriding
``model.pretrained_model_name_or_path`` with the previous stage's export (``<runs>/ar_init`` for
the first stage) and ``checkpoint.checkpoint_dir`` with ``<runs>/pbm_b{B}``. Extra ``--a.b=c``
overrides after ``--`` go to every stage. A finished stage (its ``export.json`` and ``final``
exist) is skipped, so re-running the command resumes the chain; ``--fresh`` starts over.
``<runs>/chain.json`` records the exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_STAGES", "default_config_dir", "main", "run_chain", "run_stage"]

DEFAULT_STAGES = (2, 4, 8, 16, 32)


def default_config_dir() -> Path:
    """``recipes/tiny`` of the working directory, else of the source checkout this package lives in."""
    local = Path("recipes/tiny")
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "recipes" / "tiny"


def _stage_done(ckpt_dir: Path) -> bool:
    return (ckpt_dir / "export.json").is_file() and (ckpt_dir / "final" / "config.json").is_file()


def run_stage(
    config: Path,
    overrides: Sequence[str],
    *,
    launcher: str = "torchrun",
    nproc_per_node: int = 1,
    env: Optional[dict] = None,
) -> None:
    """Run one recipe YAML with ``overrides`` through torchrun (subprocess) or in this process."""
    if launcher == "inprocess":
        from .common import run_recipe

        if nproc_per_node != 1:
            raise ValueError("--launcher inprocess runs one process; use torchrun for --nproc-per-node > 1")
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            run_recipe(config, overrides)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return
    if launcher != "torchrun":
        raise ValueError(f"launcher must be 'torchrun' or 'inprocess', got {launcher!r}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
        "-m", "nemo_automodel.cli.app", str(config), *overrides,
    ]  # fmt: skip
    logger.info("running: %s", " ".join(cmd))
    result = subprocess.run(cmd, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"stage {config} failed (exit code {result.returncode}); command: {' '.join(cmd)}")


def run_chain(
    runs: Path,
    *,
    config_dir: Optional[Path] = None,
    stages: Sequence[int] = DEFAULT_STAGES,
    ar_dir: Optional[Path] = None,
    ar_pretrain: bool = False,
    mask_embedding: str = "keep",
    launcher: str = "torchrun",
    nproc_per_node: int = 1,
    overrides: Sequence[str] = (),
    fresh: bool = False,
) -> dict:
    """Run (optionally) AR pre-training, AR init and the PBM stages; return the chain record."""
    from .ar_init import convert_ar_to_bard

    runs = Path(runs)
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if fresh and runs.exists():
        for name in ["ar_init", *(f"pbm_b{b}" for b in stages)] + (["ar"] if ar_pretrain else []):
            shutil.rmtree(runs / name, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    env = {"BARD_TINY_RUNS": str(runs)}
    record: dict = {"runs": str(runs), "config_dir": str(config_dir), "stages": {}}

    if ar_pretrain:
        ar_ckpt = runs / "ar"
        if not _stage_done(ar_ckpt):
            run_stage(config_dir / "ar_pretrain.yaml", [f"--checkpoint.checkpoint_dir={ar_ckpt}", *overrides],
                      launcher=launcher, nproc_per_node=nproc_per_node, env=env)  # fmt: skip
        ar_dir = ar_ckpt / "final"
    ar_dir = Path(ar_dir) if ar_dir is not None else runs / "ar" / "final"
    if not (ar_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no AR model at {ar_dir}: run the AR stage first (--ar-pretrain, or torchrun ... "
            f"{config_dir / 'ar_pretrain.yaml'}), or pass --ar-dir"
        )
    record["ar"] = str(ar_dir.resolve())

    init_dir = runs / "ar_init"
    first = stages[0]
    if not (init_dir / "config.json").is_file():
        convert_ar_to_bard(ar_dir, init_dir, block_size=first, mask_embedding=mask_embedding, overwrite=True)
    record["ar_init"] = str(init_dir.resolve())

    previous = init_dir
    for block in stages:
        ckpt = runs / f"pbm_b{block}"
        config = config_dir / f"pbm_b{block}.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"no recipe for block size {block}: {config}")
        if _stage_done(ckpt):
            logger.info("PBM B=%d already done (%s); skipping", block, ckpt / "final")
        else:
            stage_overrides = [
                f"--model.pretrained_model_name_or_path={previous}",
                f"--checkpoint.checkpoint_dir={ckpt}",
                f"--dataloader.collate_fn.block_size={block}",
                *overrides,
            ]
            run_stage(config, stage_overrides, launcher=launcher, nproc_per_node=nproc_per_node, env=env)
        final = ckpt / "final"
        exported = json.loads((final / "config.json").read_text()).get("block_size")
        if exported != block:
            raise RuntimeError(f"{final}/config.json has block_size {exported}, expected {block}")
        record["stages"][str(block)] = str(final.resolve())
        previous = final
    record["final"] = record["stages"][str(stages[-1])]
    (runs / "chain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m nemo_automodel_bard.recipes.chain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path(os.environ.get("BARD_TINY_RUNS", "runs/tiny")),
                        help="output root (default $BARD_TINY_RUNS or runs/tiny)")  # fmt: skip
    parser.add_argument("--config-dir", type=Path, default=None, help="directory with pbm_b{B}.yaml (default recipes/tiny)")
    parser.add_argument("--stages", default=",".join(map(str, DEFAULT_STAGES)), help="block sizes, e.g. 2,4,8,16,32")
    parser.add_argument("--ar-dir", type=Path, default=None, help="AR Qwen3-VL directory (default <runs>/ar/final)")
    parser.add_argument("--ar-pretrain", action="store_true", help="run <config-dir>/ar_pretrain.yaml first")
    parser.add_argument("--mask-embedding", choices=("keep", "mean"), default="keep", help="AR-init MASK row rule")
    parser.add_argument("--launcher", choices=("torchrun", "inprocess"), default="torchrun")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="delete earlier stage outputs under --runs first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    try:
        stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--stages must be comma-separated integers, got {args.stages!r}")
    record = run_chain(
        args.runs,
        config_dir=args.config_dir,
        stages=stages,
        ar_dir=args.ar_dir,
        ar_pretrain=args.ar_pretrain,
        mask_embedding=args.mask_embedding,
        launcher=args.launcher,
        nproc_per_node=args.nproc_per_node,
        overrides=extra,
        fresh=args.fresh,
    )
    print(f"PBM chain done; final model: {record['final']} (record: {Path(args.runs) / 'chain.json'})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

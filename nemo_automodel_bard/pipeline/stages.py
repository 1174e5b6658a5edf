"""The pipeline's stages: AR pre-training (tiny, opt-in), AR init, the SWD teacher, PBM, SWD, self-distillation,
evaluation, report.

Each stage gets the resolved config and earlier stages' outputs, writes under ``work_dir`` into a
directory named after its configuration fingerprint, and returns its outputs; the manifest records
them so an identical re-run skips the stage. Training stages are NeMo recipes (YAML + overrides);
an interrupted one resumes from its latest checkpoint when the same command is run again. A training stage
that a stop signal ended (SIGTERM / SIGINT, forwarded by the pipeline or sent to the stage) raises
:class:`PipelineStopped`, naming the stage and its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nemo_automodel_bard.decoding.defaults import DEFAULT_THRESHOLD
from nemo_automodel_bard.recipes.stop_signals import STOP_MARKER

from .environment import (
    EVALUATION_CODE,
    STREAM_STRIDE,
    TRAINING_CODE,
    code_digest,
    derive_seed,
    file_digest,
    numerics,
    stream_offset,
)
from .launch import StageStopped, run_recipe
from .manifest import Manifest, fingerprint
from .records import TrainedModel, trained_models

logger = logging.getLogger(__name__)

STAGE_ORDER = ("ar_pretrain", "ar_init", "teacher", "pbm", "swd", "self_distill", "evaluate", "report")
#: data kinds generated in-process from a seed (every training stream reads its own fresh samples)
PROCEDURAL_DATA = ("shapes", "census")


_CHECKPOINT_RE = re.compile(r"^epoch_\d+_step_(\d+)$")


class PipelineStopped(Exception):
    """A stop signal ended the training stage ``stage``; ``checkpoint`` is the directory the same command resumes
    from (``None``: it stopped before its first checkpoint and starts over), ``exit_code`` the pipeline's exit
    status (128 + the signal's number)."""

    def __init__(self, stage: str, signum: int, run_dir: Path, checkpoint: str | None, steps: int | None) -> None:
        self.stage, self.signal, self.run_dir, self.checkpoint, self.steps = stage, int(signum), run_dir, checkpoint, steps
        self.exit_code = 128 + self.signal
        name = signal.Signals(self.signal).name
        if checkpoint:
            where = f"checkpoint {checkpoint}" + (f" ({steps} steps done)" if steps is not None else "")
            then = "run the same command again to resume from it"
        else:
            where, then = "no checkpoint yet", "the same command runs it again from its start"
        super().__init__(f"stage {stage} stopped by {name}; {where}; {then}")


def _latest_checkpoint(run_dir: Path) -> str | None:
    """The newest ``epoch_*_step_*`` checkpoint directory of a training run (``None``: none)."""
    found = [(int(m.group(1)), d) for d in run_dir.glob("epoch_*_step_*") if (m := _CHECKPOINT_RE.match(d.name))
             and d.is_dir()]
    return str(max(found)[1]) if found else None


def _stopped(name: str, run_dir: Path, signum: int | None) -> PipelineStopped:
    """What a stopped training run left: the stage's ``stopped.json`` if it wrote one, else its newest checkpoint."""
    marker = run_dir / STOP_MARKER
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if signum is None:
        signum = int(getattr(signal, str(info.get("signal") or "SIGTERM"), signal.SIGTERM))
    return PipelineStopped(name, signum, run_dir, info.get("checkpoint") or _latest_checkpoint(run_dir),
                           info.get("steps"))


@dataclass
class Context:
    """Everything a stage needs: config (plain dict), directories, manifest, earlier outputs."""

    cfg: dict[str, Any]
    work_dir: Path
    output_dir: Path
    repo_root: Path
    manifest: Manifest
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: training streams used so far in this run: first task index -> stream name
    streams: dict[int, str] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The run seed: drives initialisation, data order, training images and noise of every stage
        (the held-out set depends only on ``data.seed``)."""
        return int(self.cfg.get("seed", 0) or 0)

    @property
    def recipe_dir(self) -> Path:
        path = Path(self.cfg["model"]["recipe_dir"])
        return path if path.is_absolute() else self.repo_root / path

    @property
    def launcher(self) -> dict[str, Any]:
        return dict(self.cfg["launcher"])


def _shapes_order(data: dict[str, Any], section: str) -> dict[str, Any]:
    # only a non-default order is passed on, so that runs in reading order keep their fingerprints
    order = data.get("order", "reading")
    return {} if order == "reading" else {f"{section}.order": order}


def _data_overrides(cfg: dict[str, Any], section: str = "dataset") -> dict[str, Any]:
    data = cfg["data"]
    if data["kind"] == "census":  # size and offset: per stream (_stream_overrides)
        return {f"{section}._target_": "nemo_automodel_bard.data.census.census_dataset", f"{section}.split": "train",
                f"{section}.seed": data.get("seed", 0)}
    if data["kind"] == "shapes":  # size and offset: per stream (_stream_overrides)
        return {f"{section}.seed": data.get("seed", 0), **_shapes_order(data, section)}
    if data["kind"] in ("energon", "hf"):
        return _source_overrides(data, section)
    overrides = {
        f"{section}._target_": "nemo_automodel_bard.data.factory.make_dataset",
        f"{section}.kind": "jsonl",
        f"{section}.path": str(Path(data["path"]).resolve()),
    }
    if data.get("root"):
        overrides[f"{section}.image_root"] = str(Path(data["root"]).resolve())
    return overrides


def _validation_overrides(cfg: dict[str, Any]) -> dict[str, Any]:
    data = cfg["data"]
    if data["kind"] == "census":  # the validation split: the test split is never seen before the report
        return {"validation_dataset._target_": "nemo_automodel_bard.data.census.census_dataset",
                "validation_dataset.split": "validation", "validation_dataset.seed": data.get("seed", 0),
                "validation_dataset.size": 64}
    if data["kind"] == "shapes":
        return {"validation_dataset.seed": data.get("seed", 0), **_shapes_order(data, "validation_dataset")}
    if data["kind"] == "hf" and data.get("eval_split"):
        return {**_source_overrides({**data, "split": data["eval_split"]}, "validation_dataset"),
                "validation_dataset.max_samples": 64}
    if data["kind"] in ("energon", "hf") and not data.get("eval_path"):
        return {"validation_dataset": None}  # no held-out records named: no validation loss
    path = data.get("eval_path") or data["path"]
    overrides = {
        "validation_dataset._target_": "nemo_automodel_bard.data.factory.make_dataset",
        "validation_dataset.kind": "jsonl",
        "validation_dataset.path": str(Path(path).resolve()),
        "validation_dataset.max_samples": 64,
    }
    if data.get("root"):
        overrides["validation_dataset.image_root"] = str(Path(data["root"]).resolve())
    return overrides


def _source_overrides(data: dict[str, Any], section: str) -> dict[str, Any]:
    """Energon shards (``data=energon``) or a Hugging Face dataset (``data=hf``) as a recipe's ``section``."""
    if data["kind"] == "energon":
        loader = "dataloader" if section == "dataset" else "validation_dataloader"
        return {f"{section}._target_": "nemo_automodel_bard.data.energon.energon_dataset",
                f"{section}.path": str(Path(data["path"]).resolve()),
                **{f"{section}.{key}": data.get(key) for key in ("shuffle_buffer_size", "max_samples_per_sequence")},
                f"{section}.num_workers": int(data.get("num_workers") or 0),
                f"{loader}.num_workers": 0}  # Energon's workers read; the recipe's loader only collates
    name = str(data["name"])
    overrides = {f"{section}._target_": "nemo_automodel_bard.data.factory.make_dataset", f"{section}.kind": "hf",
                 f"{section}.name": str(Path(name).resolve()) if Path(name).exists() else name,
                 f"{section}.split": data.get("split") or "train"}
    if data.get("config"):
        overrides[f"{section}.config"] = data["config"]
    if data.get("root"):
        overrides[f"{section}.image_root"] = str(Path(data["root"]).resolve())
    return overrides


def _world_size(launcher: dict[str, Any]) -> int:
    if launcher.get("kind") != "torchrun":
        return 1
    return int(launcher.get("nproc_per_node", 1) or 1) * int(launcher.get("nnodes", 1) or 1)


def _recipe_value(yaml_path: Path, given: dict[str, Any], dotted: str) -> Any:
    """``given[dotted]`` if set, else the recipe YAML's value of the dotted key (or ``None``)."""
    if dotted in given:
        return given[dotted]
    import yaml

    node: Any = yaml.safe_load(yaml_path.read_text()) or {}
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _batch_overrides(yaml_path: Path, world: int, given: dict[str, Any]) -> dict[str, Any]:
    """Split the recipe's global batch over ``world`` ranks when its micro-batch would not fit (tiny YAMLs
    use one micro-batch of 32 on one process); an explicit ``step_scheduler.local_batch_size`` wins."""
    if world <= 1 or "step_scheduler.local_batch_size" in given:
        return {}
    global_batch = int(_recipe_value(yaml_path, given, "step_scheduler.global_batch_size") or 0)
    local_batch = int(_recipe_value(yaml_path, {}, "step_scheduler.local_batch_size") or 0)
    if global_batch and local_batch and local_batch * world > global_batch:
        if global_batch % world:
            raise ValueError(f"{yaml_path.name}: global_batch_size {global_batch} does not split over {world} ranks")
        return {"step_scheduler.local_batch_size": global_batch // world}
    return {}


def _claim_stream(ctx: Context, stream: str) -> int:
    """The first task index of ``stream`` in this run; refuses two streams that would share images."""
    offset = stream_offset(ctx.seed, stream)
    owner = ctx.streams.setdefault(offset, stream)
    if owner != stream:  # pragma: no cover - a 1-in-a-million hash collision of two stream names
        raise ValueError(f"training streams {owner!r} and {stream!r} map to the same data range; rename one")
    return offset


def _stream_overrides(ctx: Context, stream: str, yaml_path: Path, given: dict[str, Any]) -> dict[str, Any]:
    """Seeds and training data of one stream (a stage, or an SWD student and its control, which share one
    so that their comparison is paired): the sampler and noise seeds derive from the run seed and the
    stream, and on the embedded tasks every stream reads its own fresh images -- as many as it consumes
    (``data.train_size: auto``), so no stage repeats an epoch and no two stages or seeds share an image."""
    out: dict[str, Any] = {"seed": derive_seed(ctx.seed, stream)}
    collate = str(_recipe_value(yaml_path, given, "dataloader.collate_fn._target_") or "")
    if collate.endswith("bard_collate_fn"):  # the diffusion noise (the AR collator draws nothing)
        out["dataloader.collate_fn.seed"] = derive_seed(ctx.seed, f"noise/{stream}")
    data = ctx.cfg["data"]
    if data["kind"] in PROCEDURAL_DATA:
        size = data.get("train_size", "auto")
        if size in (None, "auto"):
            steps = int(_recipe_value(yaml_path, given, "step_scheduler.max_steps") or 0)
            if steps <= 0:
                raise ValueError(f"data.train_size=auto needs a step count for stage {stream!r}; set "
                                 "data.train_size to an integer for stages that train by epochs")
            batch = int(_recipe_value(yaml_path, given, "step_scheduler.global_batch_size") or 0)
            size = max(steps * batch, 1)
        size = int(size)
        if size > STREAM_STRIDE:
            raise ValueError(f"data.train_size={size} exceeds the {STREAM_STRIDE} samples of a training stream")
        out.update({"dataset.offset": _claim_stream(ctx, stream), "dataset.size": size})
    elif data["kind"] == "energon":  # each stream its own shard and sample order
        out["dataset.seed_offset"] = derive_seed(ctx.seed, f"energon/{stream}") % (2**31)
    return out


def _validation_loader_overrides(yaml_path: Path, full: dict[str, Any]) -> dict[str, Any]:
    """A held-out set for a recipe whose YAML has no ``validation_dataloader`` (the real-size recipes keep it
    commented out): the recipe's own loader and collate function for it (the recipe copies the training collator's
    settings into the validation one); nothing when the recipe has a validation loader or no held-out set is set."""
    if not full.get("validation_dataset._target_") or _recipe_value(yaml_path, {}, "validation_dataloader"):
        return {}
    return {"validation_dataloader._target_": _recipe_value(yaml_path, {}, "dataloader._target_"),
            "validation_dataloader.collate_fn._target_": _recipe_value(yaml_path, {},
                                                                       "dataloader.collate_fn._target_")}


def _full_overrides(ctx: Context, yaml_path: Path, overrides: dict[str, Any], extra: dict[str, Any],
                    stream: str) -> dict[str, Any]:
    """A stage's overrides plus the data, seed, validation and batch-size ones every run gets (the
    stage's ``overrides`` section, ``extra``, wins)."""
    full = {**overrides, **_data_overrides(ctx.cfg), **_validation_overrides(ctx.cfg)}
    full.update(_validation_loader_overrides(yaml_path, full))
    full.update(_stream_overrides(ctx, stream, yaml_path, {**full, **(extra or {})}))
    full.update(extra or {})
    full.update(_batch_overrides(yaml_path, _world_size(ctx.launcher), full))
    return full


def _training_fingerprint(ctx: Context, yaml_path: Path, full: dict[str, Any]) -> str:
    """What produced a trained stage: the recipe (path and content), every override, the launcher, our
    training code, and the numerics (thread count, CPU kernels, library versions)."""
    return fingerprint(ctx.manifest.portable({
        "recipe": f"{yaml_path.parent.name}/{yaml_path.name}", "recipe_digest": file_digest(yaml_path),
        "overrides": full, "launcher": ctx.launcher, "code": code_digest(TRAINING_CODE), "numerics": numerics()}))


PEFT_STAGES = ("pbm", "swd", "self_distill")


def peft_overrides(cfg: dict[str, Any], stage: str | None) -> dict[str, Any]:
    """The recipe's ``peft:`` section for a training run of ``stage`` under the ``peft`` config group (nothing for
    ``peft=none``, for a stage not in ``peft.stages``, or for ``stage=None``: the teacher and the SWD anchor always
    train in full). docs/peft.md."""
    section = cfg.get("peft") or {}
    name = str(section.get("name", "none"))
    if name == "none" or stage is None:
        return {}
    if name != "lora":
        raise ValueError(f"peft.name must be 'none' or 'lora', got {name!r}")
    stages = [str(s) for s in section.get("stages") or ()]
    unknown = sorted(set(stages) - set(PEFT_STAGES))
    if unknown:
        raise ValueError(f"peft.stages: {unknown} do not train a student; valid: {list(PEFT_STAGES)}")
    if stage not in stages:
        return {}
    targets = [str(t) for t in section.get("target_modules") or ()]
    if section.get("vision", False):
        targets += [str(t) for t in section.get("vision_target_modules") or ()]
    if not targets:
        raise ValueError("peft.target_modules is empty: name the Linear layers that get adapters")
    dim, alpha = int(section.get("dim", 16)), int(section.get("alpha", 32))
    if dim < 1 or alpha < 1:
        raise ValueError(f"peft.dim and peft.alpha must be positive, got {dim} and {alpha}")
    return {"peft._target_": "nemo_automodel.components._peft.lora.PeftConfig", "peft.target_modules": targets,
            "peft.dim": dim, "peft.alpha": alpha, "peft.dropout": float(section.get("dropout", 0.0))}


def peft_lr_scale(cfg: dict[str, Any], stage: str | None) -> float:
    """The factor on the learning rate of a LoRA run of ``stage`` (``peft.lr_scale``; 1 for full fine-tuning and
    for the stages that train in full). Adapters starting from ``B = 0`` learn far slower than full fine-tuning at
    the same lr; the default is chosen on the census validation split (docs/peft.md)."""
    if not peft_overrides(cfg, stage):
        return 1.0
    scale = (cfg.get("peft") or {}).get("lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"peft.lr_scale must be a positive number, got {scale!r}")
    return float(scale)


def _train(ctx: Context, name: str, recipe: str, overrides: dict[str, Any], extra: dict[str, Any],
           stream: str | None = None, peft_stage: str | None = None) -> dict[str, Any]:
    """Run (or skip, or resume) one training recipe; return ``{"model_dir": ..., "log_dir": ...}`` (and
    ``adapter_dir`` for a LoRA run). ``stream`` names the seeds and data the run uses (default: ``name``);
    ``peft_stage``: the stage whose ``peft`` setting applies (``None``: full fine-tuning)."""
    yaml_path = ctx.recipe_dir / recipe
    overrides = {**overrides, **peft_overrides(ctx.cfg, peft_stage)}
    full = _full_overrides(ctx, yaml_path, overrides, extra, stream or name)
    scale = peft_lr_scale(ctx.cfg, peft_stage)
    if scale != 1.0:  # the stage's learning rate (its overrides', else the recipe's) times peft.lr_scale
        full["optimizer.lr"] = float(_recipe_value(yaml_path, full, "optimizer.lr")) * scale
    key = _training_fingerprint(ctx, yaml_path, full)
    stage_id = f"{name}"
    done = ctx.manifest.finished(stage_id, key)
    if done is not None:
        logger.info("stage %s: done earlier (%s), skipping", name, done["model_dir"])
        return done
    run_dir = ctx.work_dir / f"{name}-{key}"
    full["checkpoint.checkpoint_dir"] = str(run_dir)
    ctx.manifest.mark_started(stage_id, key)
    started = time.perf_counter()
    print(f"[bard-vl] stage {name}: training ({yaml_path.name}) -> {run_dir}", flush=True)
    (run_dir / STOP_MARKER).unlink(missing_ok=True)
    try:
        run_recipe(yaml_path, full, ctx.launcher, run_dir / "launch.log")
    except StageStopped as exc:
        raise _stopped(name, run_dir, exc.signal) from None
    if (run_dir / STOP_MARKER).is_file():  # torchrun's ranks stopped cleanly (exit 0) on a signal of their own
        raise _stopped(name, run_dir, None)
    model_dir = run_dir / "final"
    if not (model_dir / "config.json").exists():
        raise RuntimeError(f"stage {name} finished without a model directory at {model_dir}")
    outputs = {"model_dir": str(model_dir.resolve()), "log_dir": str(run_dir.resolve())}
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        outputs["adapter_dir"] = str((run_dir / "adapter").resolve())
    ctx.manifest.record(stage_id, key, outputs, time.perf_counter() - started)
    return outputs


def stage_ar_pretrain(ctx: Context) -> dict[str, Any]:
    """Tiny only: pre-train the AR model on the task (real sizes start from the published AR model)."""
    from nemo_automodel_bard.fixtures.parents import resolve_init

    model = ctx.cfg["model"]
    if model.get("init"):  # a given AR model (a directory, a hub id, or a shipped parent: parent:small)
        return {"model_path": resolve_init(model["init"]), "pretrained": True}
    section = ctx.cfg["ar_pretrain"]
    overrides: dict[str, Any] = {"step_scheduler.max_steps": section["max_steps"],
                                 "model.init_seed": derive_seed(ctx.seed, "init")}
    warmup_steps = int(section.get("vision_warmup_steps") or 0)
    kind = ctx.cfg["data"]["kind"]
    if kind in PROCEDURAL_DATA and warmup_steps > 0:
        overrides["model.vision_warmup.steps"] = warmup_steps
        if kind == "census":  # the per-cell labels of a 4 x 4 board of 32-pixel cells
            overrides.update({"model.vision_warmup.grid": 4, "model.vision_warmup.image_size": 128})
        overrides["model.vision_warmup.data_seed"] = ctx.cfg["data"].get("seed", 0)
        overrides["model.vision_warmup.seed"] = derive_seed(ctx.seed, "vision_warmup")
        overrides["model.vision_warmup.data_offset"] = _claim_stream(ctx, "vision_warmup")
    else:  # the warm-up uses the shapes task's per-cell labels; other data start from a random tower
        overrides["model.vision_warmup"] = None
    if kind == "census":
        overrides.update(_data_overrides(ctx.cfg))
    out = _train(ctx, "ar_pretrain", section["recipe"], overrides, section.get("overrides") or {})
    return {**out, "model_path": out["model_dir"]}


def _convert(ctx: Context, name: str, source: str, model_name: str) -> dict[str, Any]:
    """AR init of ``source`` as the manifest stage ``name``; the result is also the model ``model_name``, decoded
    autoregressively (the AR baseline of the same weights)."""
    from nemo_automodel_bard.recipes.ar_init import convert_ar_to_bard

    section = ctx.cfg["ar_init"]
    key = fingerprint(ctx.manifest.portable({"source": source, **section, "code": code_digest(TRAINING_CODE),
                                             "numerics": numerics()}))
    done = ctx.manifest.finished(name, key)
    if done is not None:
        return done
    target = ctx.work_dir / f"{name}-{key}"
    started = time.perf_counter()
    print(f"[bard-vl] stage {name}: {source} -> {target}", flush=True)
    convert_ar_to_bard(source, target, block_size=int(section["block_size"]),
                       mask_embedding=section.get("mask_embedding", "keep"), overwrite=True)
    outputs = {"model_dir": str(target.resolve()),
               "models": [TrainedModel(model_name, str(target.resolve()), None).to_dict()]}
    ctx.manifest.record(name, key, outputs, time.perf_counter() - started)
    return outputs


def stage_ar_init(ctx: Context) -> dict[str, Any]:
    """Convert the AR Qwen3-VL directory (``model.init``, else the ``ar_pretrain`` stage's export) into a Bard-VL
    starting directory."""
    from nemo_automodel_bard.fixtures.parents import resolve_init

    init = ctx.cfg["model"].get("init")
    source = resolve_init(init) if init else ctx.outputs["ar_pretrain"]["model_path"]
    return _convert(ctx, "ar_init", source, "ar")


def _teacher_context(ctx: Context) -> Context:
    """Where and with which seed the teacher trains: ``teacher.seed`` (an int: one teacher for every run seed, as
    one released teacher serves every student; ``null``: the run seed) and ``teacher.work_dir`` (its own manifest,
    so the runs of several seeds share the trained teacher; ``null``: the run's work_dir)."""
    section = ctx.cfg["teacher"]
    seed = section.get("seed")
    work_dir = section.get("work_dir")
    if seed is None and not work_dir:
        return ctx
    teacher = dataclasses.replace(ctx, cfg={**ctx.cfg, "seed": ctx.seed if seed is None else int(seed)}, streams={})
    if work_dir:
        path = Path(work_dir)
        path = path if path.is_absolute() else Path.cwd() / path
        path.mkdir(parents=True, exist_ok=True)
        teacher = dataclasses.replace(teacher, work_dir=path, manifest=Manifest(path))
    return teacher


def stage_teacher(ctx: Context) -> dict[str, Any]:
    """The SWD teacher, as published: a *larger* AR parent (``model.teacher_init``) converted and trained with PBM
    up to the teacher's small block size (``teacher.block_sizes``, e.g. 2 -> 4), then kept fixed. Its AR parent
    is evaluated too (``ar_large``)."""
    from nemo_automodel_bard.fixtures.parents import resolve_init

    source = ctx.cfg["model"].get("teacher_init")
    if not source:
        raise ValueError("stage teacher needs model.teacher_init (the larger AR parent: a directory or parent:large)")
    section = ctx.cfg["teacher"]
    ctx = _teacher_context(ctx)
    converted = _convert(ctx, "teacher_ar_init", resolve_init(source), "ar_large")
    models = list(converted["models"])
    current, block = converted["model_dir"], None
    blocks = [int(b) for b in section["block_sizes"]]
    steps = section["max_steps"]
    steps = [int(s) for s in steps] if isinstance(steps, (list, tuple)) else [int(steps)] * len(blocks)
    if len(steps) != len(blocks):
        raise ValueError(f"teacher.max_steps has {len(steps)} entries for {len(blocks)} block sizes {blocks}")
    log_dir, stage_dirs = None, []
    for i, (block, n) in enumerate(zip(blocks, steps)):
        out = _pbm_stage(ctx, block, current, n, f"teacher_b{block}", first=i == 0,
                         extra_overrides=section.get("overrides") or {})
        current, log_dir = out["model_dir"], out["log_dir"]
        stage_dirs.append(current)
    models.append(TrainedModel(f"teacher_b{block}", current, block, log_dir).to_dict())
    return {"model_dir": current, "block_size": block, "models": models, "stage_dirs": stage_dirs}


def applies_at(value: Any, block: int) -> bool:
    """Whether a per-block-size switch (``true``, ``false``, or a list of block sizes) is on at ``block``
    (``pbm.complementary``, ``swd.control``)."""
    if isinstance(value, (list, tuple)):
        return int(block) in {int(b) for b in value}
    return bool(value)


def _objective_overrides(section: dict[str, Any], block: int) -> dict[str, Any]:
    """The diffusion-objective options of ``pbm`` for one block size as collator overrides (only those set away
    from the published behaviour, so that default runs keep their fingerprints)."""
    out: dict[str, Any] = {}
    if applies_at(section.get("complementary"), block):
        out["dataloader.collate_fn.complementary"] = True
    if section.get("max_loss_weight") is not None:
        out["dataloader.collate_fn.max_loss_weight"] = float(section["max_loss_weight"])
    return out


def _pbm_stage(ctx: Context, block: int, init_dir: str, max_steps: int, name: str,
               first: bool = False, extra_overrides: dict[str, Any] | None = None,
               peft_stage: str | None = None) -> dict[str, Any]:
    """One PBM run (also the SWD anchor's extra steps); its seeds and data are the stream ``name``.
    ``first``: the chain's first stage, which also gets ``pbm.first_stage_overrides``; ``peft_stage``: as in
    :func:`_train`."""
    section = ctx.cfg["pbm"]
    recipe = section["recipe"]
    overrides = {
        "model.pretrained_model_name_or_path": init_dir,
        "dataloader.collate_fn.block_size": block,
        **_steps_override(max_steps),
        **_objective_overrides(section, block),
    }
    extra = dict(section.get("overrides") or {})
    if first:
        extra.update(section.get("first_stage_overrides") or {})
    # per block size, e.g. the published data: one mixture for B=4, another for B >= 8
    by_block = {int(k): v for k, v in (section.get("stage_overrides") or {}).items()}
    extra.update(by_block.get(int(block)) or {})
    extra.update(extra_overrides or {})
    return _train(ctx, name, recipe, overrides, extra, peft_stage=peft_stage)


def _steps_override(max_steps: int | None) -> dict[str, Any]:
    """``step_scheduler.max_steps`` for a step cap; nothing for ``None`` (the recipe's epochs, as published)."""
    return {} if max_steps is None else {"step_scheduler.max_steps": int(max_steps)}


def pbm_steps(section: dict[str, Any]) -> list[int | None]:
    """Steps per block size: ``pbm.max_steps`` (one int, or a list aligned with ``block_sizes``; ``None``: the
    recipe's epochs); when it is one int, ``pbm.first_stage_steps`` (if set) replaces the first stage's count and
    ``pbm.block_steps`` (block size -> steps; sizes not trained are ignored) replaces those of the sizes it
    names."""
    steps = section["max_steps"]
    blocks = list(section["block_sizes"])
    if isinstance(steps, (list, tuple)):
        if len(steps) != len(blocks):
            raise ValueError(f"pbm.max_steps has {len(steps)} entries for {len(blocks)} block sizes {blocks}")
        return [None if s is None else int(s) for s in steps]
    if steps is None:
        return [None] * len(blocks)
    out = [int(steps)] * len(blocks)
    if out and section.get("first_stage_steps"):
        out[0] = int(section["first_stage_steps"])
    by_block = {int(k): int(v) for k, v in (section.get("block_steps") or {}).items()}
    return [by_block.get(int(b), n) for b, n in zip(blocks, out)]


def stage_pbm(ctx: Context) -> dict[str, Any]:
    """Progressive block merging: each block size initialised from the previous stage's export."""
    section = ctx.cfg["pbm"]
    current = ctx.outputs["ar_init"]["model_dir"]
    result: dict[str, Any] = {"block_sizes": list(section["block_sizes"]), "models": []}
    for i, (block, steps) in enumerate(zip(section["block_sizes"], pbm_steps(section))):
        out = _pbm_stage(ctx, int(block), current, steps, f"pbm_b{block}", first=i == 0, peft_stage="pbm")
        result[f"b{block}_dir"] = current = out["model_dir"]
        result[f"b{block}_log"] = out["log_dir"]
        result["models"].append(TrainedModel(f"pbm_b{block}", out["model_dir"], int(block), out["log_dir"]).to_dict())
    return result


#: SWD keys the teacher cache does not depend on (a sweep over them reuses one cache)
_LOSS_ONLY_KEYS = ("bard.ce_weight", "bard.kd_weight", "bard.kd_direction", "bard.kd_temperature")


def _teacher_cache(ctx: Context, name: str, recipe: str, overrides: dict[str, Any], extra: dict[str, Any],
                   stream: str) -> str:
    """Build (or find) the offline teacher cache of one SWD run; return its directory."""
    from nemo_automodel_bard.recipes.common import load_recipe_config
    from nemo_automodel_bard.recipes.swd_cache import build_cache_from_config

    from .launch import format_overrides

    yaml_path = ctx.recipe_dir / recipe
    full = _full_overrides(ctx, yaml_path, overrides, extra, stream)
    key = _training_fingerprint(ctx, yaml_path, {k: v for k, v in full.items() if k not in _LOSS_ONLY_KEYS})
    done = ctx.manifest.finished(name, key)
    if done is not None:
        return done["cache_dir"]
    out = ctx.work_dir / f"{name}-{key}"
    full["bard.teacher_cache"] = str(out)
    ctx.manifest.mark_started(name, key)
    started = time.perf_counter()
    print(f"[bard-vl] stage {name}: teacher cache -> {out}", flush=True)
    build_cache_from_config(load_recipe_config(yaml_path, format_overrides(full)))
    outputs = {"cache_dir": str(out.resolve())}
    ctx.manifest.record(name, key, outputs, time.perf_counter() - started)
    return outputs["cache_dir"]


def _mask_range_override(section: dict[str, Any]) -> dict[str, Any]:
    """``swd.mask_range: [lo, hi]`` (the published SWD recipe masks 10-50 % of a block) as the collator's
    ``level_range``; nothing when unset (the full range, as PBM)."""
    value = section.get("mask_range")
    if value is None:
        return {}
    lo, hi = (float(v) for v in value)
    return {"dataloader.collate_fn.level_range": [lo, hi]}


def _control_kd() -> dict[str, Any]:
    """KD settings handed to the no-KD control runs (unused there: their KD weight is 0): the defaults."""
    from nemo_automodel_bard.objectives.distillation import SWD_DEFAULTS

    return {k: SWD_DEFAULTS[k] for k in ("top_k", "direction", "temperature")}


def stage_swd(ctx: Context) -> dict[str, Any]:
    """Stage-wise distillation from a small-block anchor, plus equal-step controls without KD."""
    section = ctx.cfg["swd"]
    pbm = ctx.outputs["pbm"]
    teacher_block = int(section["teacher_block_size"])
    result: dict[str, Any] = {"anchor_block_size": teacher_block, "models": []}
    extra = int(section.get("anchor_extra_steps") or 0)
    if section["anchor"] == "teacher":  # the published setting: a larger model's small-block stage (stage teacher)
        teacher = ctx.outputs.get("teacher")
        if not teacher:
            raise ValueError("swd.anchor=teacher needs the teacher stage's output: add `teacher` to stages (or set "
                             "swd.anchor=fixed to distil from this model's own PBM B=swd.teacher_block_size stage)")
        anchor_dir, teacher_block = teacher["model_dir"], int(teacher["block_size"])
        result["anchor_block_size"] = teacher_block
    elif section.get("anchor_path"):  # an anchor trained elsewhere (published: a larger model), used as it is
        anchor_dir = str(Path(section["anchor_path"]).resolve())
        if extra > 0:
            logger.info("swd.anchor_path is set: swd.anchor_extra_steps=%s is not applied", extra)
    else:
        if ctx.cfg["model"].get("init"):
            logger.warning("swd: no swd.anchor_path -- this size's own B=%d stage teaches; the published anchor is "
                           "the 8B model at B=%d (pass swd.anchor_path=<its export>)", teacher_block, teacher_block)
        anchor_dir = pbm[f"b{teacher_block}_dir"]
        if extra > 0:
            out = _pbm_stage(ctx, teacher_block, anchor_dir, extra, f"swd_anchor_b{teacher_block}")
            anchor_dir = out["model_dir"]
            result["anchor_log"] = out["log_dir"]
            # an anchor trained further is a model of its own (evaluated next to the PBM stage it came from)
            result["models"].append(TrainedModel(f"anchor_b{teacher_block}", anchor_dir, teacher_block,
                                                 out["log_dir"]).to_dict())
    result["anchor_dir"] = anchor_dir
    previous_teacher = (anchor_dir, teacher_block)
    student_init = {int(k): int(v) for k, v in (section.get("student_init") or {}).items()}
    for student in section["student_block_sizes"]:
        student = int(student)
        if student <= teacher_block:
            raise ValueError(f"swd.student_block_sizes: {student} is not larger than the teacher's {teacher_block}")
        teacher_dir, teacher_b = previous_teacher if section["anchor"] == "previous" else (anchor_dir, teacher_block)
        runs = [("kd", float(section["kd_weight"]))]
        if applies_at(section.get("control", True), student):
            runs.append(("ce", 0.0))
        # the PBM export the student starts from: its own block size unless swd.student_init names another
        init_block = student_init.get(student, student)
        for label, kd_weight in runs:
            # the control has no KD term: its run (and fingerprint) must not depend on the KD settings, so a
            # sweep over them trains it once
            kd = section if kd_weight else _control_kd()
            overrides = {
                "model.pretrained_model_name_or_path": pbm[f"b{init_block}_dir"],
                "teacher_model.pretrained_model_name_or_path": teacher_dir,
                "bard.teacher_block_size": teacher_b,
                "dataloader.collate_fn.block_size": student,
                **_steps_override(section["max_steps"]),
                "bard.ce_weight": float(section["ce_weight"]),
                "bard.kd_weight": kd_weight,
                "bard.kd_top_k": int(kd["top_k"]),
                "bard.kd_direction": kd["direction"],
                "bard.kd_temperature": float(kd["temperature"]),
                **_mask_range_override(section),
            }
            if kd_weight:
                overrides["bard.kd_at_block_padding"] = bool(section.get("kd_at_block_padding", False))
                if section.get("teacher_cache", False):  # offline teacher: its top-k computed once per student
                    overrides["bard.teacher_cache"] = _teacher_cache(
                        ctx, f"swd_teacher_b{student}", section["recipe"], overrides, section.get("overrides") or {},
                        stream=f"swd_b{student}")
                    result[f"teacher_cache_b{student}"] = overrides["bard.teacher_cache"]
            # the student and its control share one stream: same images, order and noise (a paired comparison)
            out = _train(ctx, f"swd_{label}_b{student}", section["recipe"], overrides, section.get("overrides") or {},
                         stream=f"swd_b{student}", peft_stage="swd")
            result[f"{label}_b{student}_dir"] = out["model_dir"]
            result[f"{label}_b{student}_log"] = out["log_dir"]
            result["models"].append(TrainedModel(f"swd_{label}_b{student}", out["model_dir"], student,
                                                 out["log_dir"]).to_dict())
        if section["anchor"] == "previous":
            previous_teacher = (result[f"kd_b{student}_dir"], student)
    return result


def self_distill_source(ctx: Context) -> str:
    """The export the ``self_distill`` stage starts from (and whose answers it trains on)."""
    section = ctx.cfg["self_distill"]
    block = int(section["block_size"])
    if section["source"] == "swd_kd":
        return ctx.outputs["swd"][f"kd_b{block}_dir"]
    return ctx.outputs["pbm"][f"b{block}_dir"]


def stage_self_distill(ctx: Context) -> dict[str, Any]:
    """Certainty-forcing self-distillation: the model decodes its own training prompts (a fresh stream of
    them), the answers it gets right become the training data of a PBM run with the certainty term."""
    from nemo_automodel_bard.recipes.common import load_recipe_config

    from .launch import format_overrides
    from .trajectories import write_trajectories

    section = ctx.cfg["self_distill"]
    block = int(section["block_size"])
    source = self_distill_source(ctx)
    yaml_path = ctx.recipe_dir / section["recipe"]
    overrides = {
        "model.pretrained_model_name_or_path": source,
        "dataloader.collate_fn.block_size": block,
        **_steps_override(section["max_steps"]),
        "bard.certainty_weight": float(section["certainty_weight"]),
        **_objective_overrides(ctx.cfg["pbm"], block),  # the source stage's objective options
    }
    extra = dict(section.get("overrides") or {})
    if section.get("num_prompts"):  # fewer prompts than the stage's images (shapes) / the whole training file
        count = int(section["num_prompts"])
        extra["dataset.size" if ctx.cfg["data"]["kind"] in PROCEDURAL_DATA else "dataset.max_samples"] = count
    stream = "self_distill"
    # 1. the trajectories: the prompts this stage would train on, decoded by the source model
    full = _full_overrides(ctx, yaml_path, overrides, extra, stream)
    decode = {k: section[k] for k in ("threshold", "keep", "batch_size", "max_new_tokens")}
    key = fingerprint(ctx.manifest.portable({
        "model": source, "recipe_digest": file_digest(yaml_path), "overrides": full, "decode": decode,
        "code": code_digest(EVALUATION_CODE), "numerics": numerics()}))
    done = ctx.manifest.finished("self_distill_trajectories", key)
    if done is None:
        out_dir = ctx.work_dir / f"self_distill_trajectories-{key}"
        ctx.manifest.mark_started("self_distill_trajectories", key)
        started = time.perf_counter()
        dataset = load_recipe_config(yaml_path, format_overrides(full)).dataset.instantiate()
        print(f"[bard-vl] stage self_distill: decoding {len(dataset)} training prompts with {source}", flush=True)
        summary = write_trajectories(
            source, (dataset[i] for i in range(len(dataset))), out_dir, data_kind=ctx.cfg["data"]["kind"],
            order=str(ctx.cfg["data"].get("order", "reading")), block_size=block,
            threshold=float(section["threshold"]), batch_size=int(section["batch_size"]),
            max_new_tokens=int(section["max_new_tokens"]), keep=str(section["keep"]),
            device=str(ctx.cfg["evaluate"].get("device", "auto")))
        print(f"[bard-vl] stage self_distill: kept {summary['num_kept']} of {summary['num_decoded']} answers "
              f"(accuracy {100 * summary['accuracy']:.1f}%, {summary['tokens_per_forward']:.2f} tokens/forward)",
              flush=True)
        done = {"trajectories": summary["path"], "summary": str(out_dir / "summary.json")}
        ctx.manifest.record("self_distill_trajectories", key, done, time.perf_counter() - started)
    # 2. training on them (the same stream: its seeds; the data are the kept answers)
    extra.update({"dataset._target_": "nemo_automodel_bard.data.factory.make_dataset", "dataset.kind": "jsonl",
                  "dataset.path": done["trajectories"]})
    out = _train(ctx, "self_distill", section["recipe"], overrides, extra, stream=stream, peft_stage="self_distill")
    result = {"block_size": block, "source_dir": source, "model_dir": out["model_dir"], "log_dir": out["log_dir"],
              "models": [TrainedModel(f"self_distill_b{block}", out["model_dir"], block, out["log_dir"]).to_dict()],
              "trajectories": done["trajectories"], "trajectory_summary": done["summary"]}
    if section.get("control", False) and float(section["certainty_weight"]) > 0:
        # the control: the same steps, answers, order and noise without the certainty term (is the gain the
        # term's, or only more fine-tuning on right answers?)
        control = _train(ctx, "self_distill_ce", section["recipe"], {**overrides, "bard.certainty_weight": 0.0}, extra,
                         stream=stream, peft_stage="self_distill")
        result.update(control_dir=control["model_dir"], control_log=control["log_dir"])
        result["models"].append(TrainedModel(f"self_distill_ce_b{block}", control["model_dir"], block,
                                             control["log_dir"]).to_dict())
    return result


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    """Decode the held-out set with every model; write one JSON per (model, threshold)."""
    from .evaluate import evaluate_model, heldout_records, write_result

    section = ctx.cfg["evaluate"]
    split = str(section.get("split", "test"))
    records = heldout_records(ctx.cfg["data"], int(section["num_samples"]), split=split)
    candidates = [(m.name, m.model_dir, m.block_size) for m in trained_models(ctx.outputs)
                  if m.block_size is not None or section.get("ar_baseline", True)]
    results_dir = ctx.output_dir / "eval"
    results: dict[str, Any] = {"results_dir": str(results_dir), "entries": []}
    # the rendered trajectory is the final PBM stage's (largest block), else the last model decoded
    pbm_names = [name for name, _, _ in candidates if name.startswith("pbm_b")]
    final_name = pbm_names[-1] if pbm_names else (candidates[-1][0] if candidates else None)
    for name, model_dir, block in candidates:
        thresholds = [None] if block is None else list(section["thresholds"])
        for threshold in thresholds:
            tag = f"{name}" + ("" if threshold is None else f"@{threshold}")
            path = results_dir / f"{tag}.json"
            # the device and compiling change how fast, not what is decoded (up to float rounding): not in the key
            settings = {k: v for k, v in section.items() if k not in ("device", "compile")}
            key = fingerprint(ctx.manifest.portable({
                "model": model_dir, "threshold": threshold, **settings, "data": ctx.cfg["data"],
                "code": code_digest(EVALUATION_CODE), "numerics": numerics()}))
            done = ctx.manifest.finished(f"evaluate:{ctx.output_dir}:{tag}", key)
            if done is None:
                print(f"[bard-vl] evaluate {tag} on {len(records)} held-out samples", flush=True)
                started = time.perf_counter()
                wants_trajectory = name == final_name and threshold == thresholds[0]
                result = evaluate_model(
                    model_dir, records, data_kind=ctx.cfg["data"]["kind"], mode="ar" if block is None else "diffusion",
                    speed_samples=int(section.get("speed_samples", 0) or 0) if threshold in (None, thresholds[0]) else 0,
                    speed_repeats=int(section.get("speed_repeats", 0) or 0),
                    order=str(ctx.cfg["data"].get("order", "reading")),
                    block_size=block, threshold=threshold if threshold is not None else DEFAULT_THRESHOLD,
                    remasking_strategy=section["remasking_strategy"], denoising_steps=section.get("denoising_steps"),
                    batch_size=int(section["batch_size"]), max_new_tokens=int(section["max_new_tokens"]),
                    record_trajectory_of=int(ctx.cfg["report"]["trajectory_index"]) if wants_trajectory else None,
                    device=str(section.get("device", "auto")), compile=bool(section.get("compile", False)),
                )
                result.update(name=name, model_dir=model_dir,
                              split=split if ctx.cfg["data"]["kind"] == "census" else "heldout")
                write_result(result, path)
                ctx.manifest.record(f"evaluate:{ctx.output_dir}:{tag}", key, {"result_file": str(path)},
                                    time.perf_counter() - started)
            results["entries"].append({"name": name, "threshold": threshold, "block_size": block,
                                       "result_file": str(path)})
    return results


def stage_report(ctx: Context) -> dict[str, Any]:
    """Table on stdout, ``report.md`` and PNG plots in the output directory."""
    from .report import write_report

    return write_report(ctx)


STAGES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "ar_pretrain": stage_ar_pretrain,
    "ar_init": stage_ar_init,
    "teacher": stage_teacher,
    "pbm": stage_pbm,
    "swd": stage_swd,
    "self_distill": stage_self_distill,
    "evaluate": stage_evaluate,
    "report": stage_report,
}

__all__ = ["Context", "STAGES", "STAGE_ORDER", "pbm_steps"]

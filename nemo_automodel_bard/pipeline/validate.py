"""Configuration checks that run before any work starts, with errors naming the offending key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from nemo_automodel_bard.diffusion.losses import kd_direction

from .stages import PEFT_STAGES, PROCEDURAL_DATA, STAGE_ORDER, pbm_steps, peft_lr_scale, peft_overrides

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PipelineConfigError(ValueError):
    """An inconsistent pipeline configuration (raised before any stage runs)."""


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PipelineConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _block_switch(value: Any, key: str, what: str = "block sizes") -> None:
    """A per-block-size switch: ``true``, ``false`` or a list of positive block sizes."""
    if not isinstance(value, bool) and not (
            isinstance(value, (list, tuple)) and all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                                     for b in value)):
        raise PipelineConfigError(f"{key} must be true, false or a list of {what}, got {value!r}")


def validate_config(cfg: dict[str, Any], repo_root: Path, available_outputs: set[str]) -> None:
    """Raise :class:`PipelineConfigError` for an inconsistent configuration."""
    stages = list(cfg.get("stages") or [])
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise PipelineConfigError(f"stages: unknown stage(s) {unknown}; valid stages are {list(STAGE_ORDER)}")
    if not stages:
        raise PipelineConfigError("stages: empty; name at least one of " + ", ".join(STAGE_ORDER))

    blocks = [_positive_int(b, "pbm.block_sizes[]") for b in cfg["pbm"]["block_sizes"]]
    if not blocks:
        raise PipelineConfigError("pbm.block_sizes: empty")
    if any(b2 <= b1 for b1, b2 in zip(blocks, blocks[1:])):
        raise PipelineConfigError(f"pbm.block_sizes must be strictly increasing, got {blocks}")
    steps = cfg["pbm"]["max_steps"]  # null: the recipes' epochs (real sizes)
    for key, value in (cfg["pbm"].get("block_steps") or {}).items():
        _positive_int(key, "pbm.block_steps (a block size)")
        _positive_int(value, f"pbm.block_steps[{key}]")
    if isinstance(steps, (list, tuple)):
        for value in steps:
            if value is not None:
                _positive_int(value, "pbm.max_steps[]")
    elif steps is not None:
        _positive_int(steps, "pbm.max_steps")
    if cfg["swd"].get("max_steps") is not None:
        _positive_int(cfg["swd"]["max_steps"], "swd.max_steps")
    try:
        pbm_steps(cfg["pbm"])  # the same per-stage expansion the pbm stage uses
    except ValueError as err:
        raise PipelineConfigError(f"{err} (one int, or one per block size)") from None
    if cfg["pbm"].get("first_stage_steps") is not None:
        _positive_int(cfg["pbm"]["first_stage_steps"], "pbm.first_stage_steps")
    for key, value in (cfg["pbm"].get("stage_overrides") or {}).items():
        try:
            known = int(key) in blocks
        except (TypeError, ValueError):
            known = False
        if not known:
            raise PipelineConfigError(f"pbm.stage_overrides: {key!r} is not one of pbm.block_sizes {blocks}")
        if not isinstance(value, dict):
            raise PipelineConfigError(f"pbm.stage_overrides.{key} must be a mapping of recipe keys, got {value!r}")
    cap = cfg["pbm"].get("max_loss_weight")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        raise PipelineConfigError(f"pbm.max_loss_weight must be a positive number or null, got {cap!r}")
    _block_switch(cfg["pbm"].get("complementary", False), "pbm.complementary")

    swd = cfg["swd"]
    teacher_stage = cfg.get("teacher") or {}
    if "teacher" in stages or ("swd" in stages and swd["anchor"] == "teacher"):
        teacher_blocks = [_positive_int(b, "teacher.block_sizes[]") for b in teacher_stage.get("block_sizes") or []]
        if not teacher_blocks:
            raise PipelineConfigError("teacher.block_sizes: empty (the last one is the teacher's block size)")
        if any(b2 <= b1 for b1, b2 in zip(teacher_blocks, teacher_blocks[1:])):
            raise PipelineConfigError(f"teacher.block_sizes must be strictly increasing, got {teacher_blocks}")
        tsteps = teacher_stage.get("max_steps")
        tsteps = list(tsteps) if isinstance(tsteps, (list, tuple)) else [tsteps] * len(teacher_blocks)
        if len(tsteps) != len(teacher_blocks):
            raise PipelineConfigError(f"teacher.max_steps has {len(tsteps)} entries for {len(teacher_blocks)} block "
                                      f"sizes {teacher_blocks} (one int, or one per block size)")
        for value in tsteps:
            _positive_int(value, "teacher.max_steps")
        if "teacher" in stages and not cfg["model"].get("teacher_init"):
            raise PipelineConfigError("stage teacher needs model.teacher_init (the larger AR parent: a directory, a hub "
                                      "id, or parent:large)")
    if "swd" in stages:
        if swd["anchor"] == "teacher":
            teacher = int(teacher_stage["block_sizes"][-1])
            if "teacher" not in stages and "teacher" not in available_outputs:
                raise PipelineConfigError("swd.anchor=teacher needs the outputs of 'teacher', which is neither in "
                                          f"stages={stages} nor recorded in the manifest of this work_dir; add it to "
                                          "stages (or set swd.anchor=fixed)")
        else:
            teacher = _positive_int(swd["teacher_block_size"], "swd.teacher_block_size")
        anchor_path = swd.get("anchor_path")
        if swd["anchor"] == "teacher":
            pass
        elif anchor_path:
            anchor = Path(anchor_path)
            anchor = anchor if anchor.is_absolute() else Path.cwd() / anchor
            if not (anchor / "config.json").is_file():
                raise PipelineConfigError(f"swd.anchor_path: {anchor} is not an exported model directory (no config.json)")
        elif teacher not in blocks:
            raise PipelineConfigError(
                f"swd.teacher_block_size={teacher} is not one of pbm.block_sizes {blocks} (the anchor is a PBM stage)"
            )
        if swd["anchor"] not in ("teacher", "fixed", "previous"):
            raise PipelineConfigError(f"swd.anchor must be 'teacher', 'fixed' or 'previous', got {swd['anchor']!r}")
        if swd.get("mask_range") is not None:
            from nemo_automodel_bard.diffusion.noise import check_level_range

            try:
                check_level_range(swd["mask_range"])
            except ValueError as exc:
                raise PipelineConfigError(f"swd.mask_range: {exc}") from None
        for student in swd["student_block_sizes"]:
            _positive_int(student, "swd.student_block_sizes[]")
            if student <= teacher:
                raise PipelineConfigError(
                    f"swd.student_block_sizes: teacher block size {teacher} must be smaller than the student's {student}"
                )
            if student not in blocks:
                raise PipelineConfigError(f"swd.student_block_sizes: {student} has no PBM stage (pbm.block_sizes={blocks})")
        _block_switch(swd.get("control", True), "swd.control", "student block sizes")
        for student, init in (swd.get("student_init") or {}).items():  # students not trained are ignored
            if int(student) in swd["student_block_sizes"] and init not in blocks:
                raise PipelineConfigError(
                    f"swd.student_init: the B={student} student cannot start from B={init}: no PBM stage "
                    f"(pbm.block_sizes={blocks})")
        if not isinstance(swd.get("teacher_cache", False), bool):
            raise PipelineConfigError(f"swd.teacher_cache must be true or false, got {swd.get('teacher_cache')!r}")
        try:
            kd_direction(swd["direction"])
        except ValueError:
            raise PipelineConfigError(f"swd.direction must be 'forward' or 'reverse', got {swd['direction']!r}") from None

    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PipelineConfigError(f"seed must be a non-negative integer, got {seed!r}")
    threads = cfg.get("threads")
    if threads is not None:
        _positive_int(threads, "threads")
    for stage in PEFT_STAGES:  # the peft group: name, stages, targets, rank and alpha (docs/peft.md)
        try:
            peft_overrides(cfg, stage)
            peft_lr_scale(cfg, stage)
        except (TypeError, ValueError) as exc:
            raise PipelineConfigError(str(exc)) from None

    if cfg["data"].get("kind") in PROCEDURAL_DATA:
        size = cfg["data"].get("train_size", "auto")
        if size not in (None, "auto"):
            _positive_int(size, "data.train_size")
        elif None in pbm_steps(cfg["pbm"]) or ("swd" in stages and cfg["swd"].get("max_steps") is None) or (
                "self_distill" in stages and cfg["self_distill"].get("max_steps") is None):
            raise PipelineConfigError("data.train_size=auto sizes each stage's fresh data by its steps; stages that "
                                      "train by epochs (max_steps null) need an integer data.train_size")

    if cfg["data"].get("kind") == "shapes":
        from nemo_automodel_bard.data.shapes import ANSWER_ORDERS

        if cfg["data"].get("order", "reading") not in ANSWER_ORDERS:
            raise PipelineConfigError(f"data.order must be one of {ANSWER_ORDERS}, got {cfg['data'].get('order')!r}")

    evaluate = cfg["evaluate"]
    for threshold in evaluate["thresholds"]:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < float(threshold) <= 1:
            raise PipelineConfigError(f"evaluate.thresholds: {threshold!r} is not a confidence threshold in (0, 1]")
    for key in ("num_samples", "batch_size", "max_new_tokens"):
        _positive_int(evaluate.get(key), f"evaluate.{key}")
    if evaluate.get("split", "test") not in ("test", "validation"):
        raise PipelineConfigError(f"evaluate.split must be 'test' or 'validation', got {evaluate.get('split')!r}")
    for key in ("speed_samples", "speed_repeats"):
        value = evaluate.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PipelineConfigError(f"evaluate.{key} must be an integer >= 0, got {value!r}")
    if evaluate.get("denoising_steps") is not None:
        _positive_int(evaluate["denoising_steps"], "evaluate.denoising_steps")
    from nemo_automodel_bard.decoding.unmasking import UnmaskingRule

    try:
        UnmaskingRule.parse(str(evaluate.get("remasking_strategy")))
    except ValueError as exc:
        raise PipelineConfigError(f"evaluate.remasking_strategy: {exc}") from None

    from .evaluate import resolve_device

    try:
        resolve_device(str(cfg["evaluate"].get("device", "auto")))
    except ValueError as exc:
        raise PipelineConfigError(str(exc)) from None

    model = cfg["model"]
    recipe_dir = Path(model["recipe_dir"])
    recipe_dir = recipe_dir if recipe_dir.is_absolute() else repo_root / recipe_dir
    if not recipe_dir.is_dir():
        raise PipelineConfigError(f"model.recipe_dir: {recipe_dir} does not exist")
    init = model.get("init")
    _check_init(init, "model.init")
    if "teacher" in stages:
        _check_init(model.get("teacher_init"), "model.teacher_init")
    if not init and "ar_pretrain" in stages and not (recipe_dir / cfg["ar_pretrain"]["recipe"]).exists():
        raise PipelineConfigError(f"ar_pretrain.recipe: {recipe_dir / cfg['ar_pretrain']['recipe']} does not exist")
    needed = {"pbm": [cfg["pbm"]["recipe"]], "swd": [swd["recipe"]],
              "self_distill": [cfg["self_distill"]["recipe"]] if "self_distill" in cfg else []}
    for stage, files in needed.items():
        if stage in stages:
            for name in files:
                if not (recipe_dir / name).exists():
                    raise PipelineConfigError(f"{stage}: recipe {recipe_dir / name} does not exist")

    data = cfg["data"]
    if data["kind"] in ("energon", "hf"):
        _validate_data_source(data, stages, bool(cfg.get("swd", {}).get("teacher_cache")))
    if data["kind"] in ("jsonl", "energon", "hf"):
        path = data.get("path")
        if data["kind"] == "jsonl" and (not path or path == "???"):
            raise PipelineConfigError("data.path is required with data=jsonl (a chat-format JSONL file)")
        if data["kind"] == "jsonl" and not Path(path).exists():
            raise PipelineConfigError(f"data.path: {path} does not exist")
        if data.get("root") and not Path(data["root"]).is_dir():
            raise PipelineConfigError(f"data.root: {data['root']} is not a directory")
        if "evaluate" in stages and not data.get("eval_path") and not data.get("eval_split"):
            raise PipelineConfigError("data.eval_path is required to evaluate on chat-format data"
                                      + (" (or data.eval_split)" if data["kind"] == "hf" else ""))
        if "evaluate" in stages:
            if data.get("eval_path") and not Path(data["eval_path"]).exists():
                raise PipelineConfigError(f"data.eval_path: {data['eval_path']} does not exist")
            from .evaluate import EvalDataError, heldout_records

            try:  # every held-out record is checked now, not after hours of training
                records = heldout_records(data, int(evaluate["num_samples"]))
            except (EvalDataError, ValueError, OSError) as exc:
                raise PipelineConfigError(str(exc)) from None
            unusable = getattr(records, "unusable", [])
            if unusable:
                first = "; ".join(f"record {i}: {r}" for i, r in unusable[:3])
                print(f"[bard-vl] data.eval_path: {len(unusable)} of {len(records) + len(unusable)} held-out records "
                      f"cannot be evaluated and are left out (listed in the report): {first}", flush=True)
    elif data["kind"] not in PROCEDURAL_DATA:
        raise PipelineConfigError(f"data.kind must be 'census', 'shapes', 'jsonl', 'energon' or 'hf', got "
                                  f"{data['kind']!r}")

    if "self_distill" in stages:
        distill = cfg["self_distill"]
        block = _positive_int(distill["block_size"], "self_distill.block_size")
        if distill["source"] not in ("pbm", "swd_kd"):
            raise PipelineConfigError(f"self_distill.source must be 'pbm' or 'swd_kd', got {distill['source']!r}")
        if block not in blocks:
            raise PipelineConfigError(f"self_distill.block_size={block} has no PBM stage (pbm.block_sizes={blocks})")
        if distill["source"] == "swd_kd" and block not in cfg["swd"]["student_block_sizes"]:
            raise PipelineConfigError(f"self_distill.source=swd_kd needs a B={block} SWD student "
                                      f"(swd.student_block_sizes={list(cfg['swd']['student_block_sizes'])})")
        if distill.get("max_steps") is not None:
            _positive_int(distill["max_steps"], "self_distill.max_steps")
        if distill.get("num_prompts") is not None:
            _positive_int(distill["num_prompts"], "self_distill.num_prompts")
        if distill["keep"] not in ("matching", "all"):
            raise PipelineConfigError(f"self_distill.keep must be 'matching' or 'all', got {distill['keep']!r}")
        weight = distill["certainty_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise PipelineConfigError(f"self_distill.certainty_weight must be a number >= 0, got {weight!r}")
        threshold = distill["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise PipelineConfigError(f"self_distill.threshold must be in [0, 1], got {threshold!r}")

    requires = {"ar_init": [] if cfg["model"].get("init") else ["ar_pretrain"], "pbm": ["ar_init"], "swd": ["pbm"], "evaluate": ["ar_init"],
                "report": ["evaluate"],
                "self_distill": ["swd" if cfg.get("self_distill", {}).get("source") == "swd_kd" else "pbm"]}
    for stage in stages:
        for need in requires.get(stage, []):
            if need not in stages and need not in available_outputs:
                raise PipelineConfigError(
                    f"stage {stage!r} needs the outputs of {need!r}, which is neither in stages={stages} nor "
                    f"recorded in the manifest of this work_dir; add it to stages"
                )


def _check_init(init: Any, key: str) -> None:
    """A given AR model: a shipped parent (``parent:NAME``, checksums verified), a directory or a hub id."""
    if not init:
        return
    from nemo_automodel_bard.fixtures.parents import PARENT_PREFIX, ParentError, resolve_init

    if str(init).startswith(PARENT_PREFIX):
        try:
            resolve_init(str(init))
        except ParentError as exc:
            raise PipelineConfigError(f"{key}: {exc}") from None
    elif not Path(str(init)).exists() and not _HUB_ID.match(str(init)):
        raise PipelineConfigError(f"{key}: checkpoint path {init!r} does not exist (and is not a hub id)")


def _validate_data_source(data: dict, stages: list, cfg_swd_cache: bool = False) -> None:
    """``data=energon``: prepared shards or a metadataset YAML; ``data=hf``: a dataset name (opened now, so that a
    wrong name or split fails before any training)."""
    if data["kind"] == "energon":
        path = data.get("path")
        if not path or path == "???":
            raise PipelineConfigError("data.path is required with data=energon (a prepared Energon dataset directory "
                                      "or a metadataset YAML)")
        try:
            from nemo_automodel_bard.data.energon import EnergonDataError, check_energon_path, require_energon

            require_energon()
            check_energon_path(path)
        except (ImportError, EnergonDataError) as exc:
            raise PipelineConfigError(f"data.path: {exc}") from None
        if "swd" in stages and cfg_swd_cache:
            raise PipelineConfigError("swd.teacher_cache precomputes the teacher per sample index: it needs a "
                                      "map-style dataset (data=jsonl or data=hf); use swd.teacher_cache=false")
        if "self_distill" in stages:
            raise PipelineConfigError("self_distill decodes its training prompts one by one: it needs a map-style "
                                      "dataset (data=jsonl or data=hf), not an Energon stream")
        return
    name = data.get("name")
    if not name or name == "???":
        raise PipelineConfigError("data.name is required with data=hf (a local dataset directory or a cached hub name)")
    from nemo_automodel_bard.data.hf_dataset import HFChatDataset

    for split in [data.get("split") or "train", *([data["eval_split"]] if data.get("eval_split") else [])]:
        try:
            HFChatDataset(str(name), split=split, config=data.get("config"), max_samples=1)
        except (ImportError, ValueError) as exc:
            raise PipelineConfigError(f"data.name: {exc}") from None


__all__ = ["PipelineConfigError", "validate_config"]

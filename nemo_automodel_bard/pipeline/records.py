"""Typed records of what the training stages produced, for the stages after them.

Every training stage's outputs (as the manifest stores them) hold ``"models"``: one :class:`TrainedModel`
per model it trained, with its evaluation name, directory, block size and training log. The evaluation, the
report and the loss curves read these records; nothing parses a block size out of a key name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

__all__ = ["TrainedModel", "trained_models"]

#: the stages whose models are evaluated, in the order they appear in tables and plots
MODEL_STAGES = ("ar_init", "teacher", "pbm", "swd", "self_distill")


@dataclass(frozen=True)
class TrainedModel:
    """One model a stage produced.

    Attributes:
        name: its name in results, tables and plots (``ar``, ``ar_large``, ``teacher_b4``, ``pbm_b16``, ``swd_kd_b32``,
            ``swd_ce_b32``, ``anchor_b4``, ``self_distill_b32``, ``self_distill_ce_b32``).
        model_dir: the Hugging Face model directory.
        block_size: the block size it decodes with; ``None`` for the autoregressive model.
        log_dir: the training run's directory (its ``training.jsonl``), if it was trained here.
    """

    name: str
    model_dir: str
    block_size: Optional[int]
    log_dir: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainedModel":
        block = data.get("block_size")
        return cls(name=str(data["name"]), model_dir=str(data["model_dir"]),
                   block_size=None if block is None else int(block), log_dir=data.get("log_dir"))


def _legacy_records(stage: str, outputs: Mapping[str, Any]) -> list[TrainedModel]:
    """Records of a manifest written before stages recorded ``models`` (kept readable, so old runs can be
    re-evaluated): derived from the output keys those versions wrote."""
    if stage == "ar_init":
        return [TrainedModel("ar", outputs["model_dir"], None)]
    if stage == "pbm":
        return [TrainedModel(f"pbm_b{b}", outputs[f"b{b}_dir"], int(b), outputs.get(f"b{b}_log"))
                for b in outputs.get("block_sizes", [])]
    if stage == "swd":
        out = []
        if outputs.get("anchor_log"):  # an anchor trained further
            block = int(outputs["anchor_block_size"])
            out.append(TrainedModel(f"anchor_b{block}", outputs["anchor_dir"], block, outputs["anchor_log"]))
        for key, value in outputs.items():
            if key.endswith("_dir") and key.split("_", 1)[0] in ("kd", "ce"):
                label, block = key[:-4].split("_b")
                out.append(TrainedModel(f"swd_{label}_b{block}", value, int(block), outputs.get(f"{key[:-4]}_log")))
        return out
    if stage == "self_distill" and outputs.get("model_dir"):
        block = int(outputs["block_size"])
        return [TrainedModel(f"self_distill_b{block}", outputs["model_dir"], block, outputs.get("log_dir"))]
    return []


def trained_models(outputs: Mapping[str, Mapping[str, Any]]) -> list[TrainedModel]:
    """Every model the stages in ``outputs`` (stage name -> its outputs) produced, in :data:`MODEL_STAGES` order."""
    models: list[TrainedModel] = []
    for stage in MODEL_STAGES:
        stage_outputs = outputs.get(stage)
        if not stage_outputs:
            continue
        if "models" in stage_outputs:
            models += [TrainedModel.from_dict(m) for m in stage_outputs["models"]]
        else:
            models += _legacy_records(stage, stage_outputs)
    return models

"""The study scripts behind docs/results.md's conversion budget: checkpoint discovery and the census part scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nemo_automodel_bard.data.census import census_dataset, format_census, parse_census

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(i: int) -> str:
    return census_dataset(split="validation", size=i + 1)[i]["messages"][-1]["content"][0]["text"]


def test_census_parts_scores_each_part_and_accepts_any_count_order():
    parts = _load("census_parts").parts
    references = [_reference(i) for i in range(3)]
    gold = parse_census(references[0])
    # the same answer with both count lists reversed: every part right
    reordered = format_census(gold.objects, [c for c, _ in reversed(gold.colors)], [s for s, _ in reversed(gold.shapes)])
    second = parse_census(references[1])
    colour, count = second.colors[0]
    wrong_colours = references[1].replace(f"{colour} {count},", f"{colour} {count + 1},", 1).replace(
        f"{colour} {count}.", f"{colour} {count + 1}.", 1)
    assert parse_census(wrong_colours).colors != second.colors
    result = parts([reordered, wrong_colours, "no answer at all"], references)
    assert result["parsed"] == 2
    assert result["listing"] == 2 and result["shape_counts"] == 2 and result["total"] == 2
    assert result["colour_counts"] == 1 and result["all"] == 1


def test_census_parts_refuses_unparseable_references():
    with pytest.raises(ValueError, match="reference does not parse"):
        _load("census_parts").parts(["x"], ["not a census answer"])


def test_checkpoint_curve_finds_exported_and_single_shard_checkpoints(tmp_path):
    curve = _load("checkpoint_curve")
    stage = tmp_path / "pbm_b2-abc"
    (stage / "final").mkdir(parents=True)
    (stage / "final" / "config.json").write_text("{}")
    (stage / "final" / "tokenizer.json").write_text("{}")
    (stage / "final" / "model-00001-of-00001.safetensors").write_bytes(b"final weights")
    (stage / "epoch_0_step_9" / "model").mkdir(parents=True)  # exported: loadable as it is
    (stage / "epoch_0_step_9" / "model" / "config.json").write_text("{}")
    shard_dir = stage / "epoch_0_step_19" / "model"  # one unconsolidated shard
    shard_dir.mkdir(parents=True)
    (shard_dir / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"step 20 weights")
    (stage / "epoch_0_step_29" / "model").mkdir(parents=True)  # nothing loadable: left out
    (stage / "validation.jsonl").write_text(json.dumps({"step": 19, "val_ce": 0.5}) + "\n")

    found = curve.checkpoints(stage, tmp_path / "scratch")
    assert [steps for steps, _ in found] == [10, 20]
    assert found[0][1] == stage / "epoch_0_step_9" / "model"
    made = found[1][1]
    assert (made / "model-00001-of-00001.safetensors").read_bytes() == b"step 20 weights"
    assert (made / "config.json").is_file() and (made / "tokenizer.json").is_file()
    assert curve.validation_losses(stage) == {20: 0.5}

    (stage / "epoch_0_step_9" / "model" / "config.json").unlink()
    (stage / "epoch_0_step_19" / "model" / "shard-00001-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(SystemExit, match="no loadable"):
        curve.checkpoints(stage, tmp_path / "scratch2")

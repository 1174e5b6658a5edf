"""Helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

#: recipe overrides that make a tiny run take seconds
QUICK_RECIPE = [
    "--step_scheduler.global_batch_size=4",
    "--step_scheduler.local_batch_size=2",
    "--step_scheduler.ckpt_every_steps=100",
    "--validation_dataset=None",
    "--dataset.size=32",
    "--bard.progress_bar=false",
]


def read_weights(directory: Path) -> dict:
    """Every tensor of the ``*.safetensors`` files of a model directory."""
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def boost_logits(model, rule) -> None:
    """Wrap forward: ``rule(batch_index, position, input_token) -> (token, amount) | None`` per logits row."""
    original = model.forward

    def boosted(*args, **kwargs):
        out = original(*args, **kwargs)
        rows = kwargs.get("logits_positions")
        if rows is None or rows.numel() == 0:
            return out
        q_len = kwargs["input_ids"].shape[1]
        positions = kwargs["position_ids"][0].reshape(-1)[rows]
        tokens = kwargs["input_ids"].reshape(-1)[rows]
        for r in range(rows.numel()):
            hit = rule(int(rows[r]) // q_len, int(positions[r]), int(tokens[r]))
            if hit is not None:
                out.logits[r, hit[0]] += hit[1]
        return out

    model.forward = boosted


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread (stable timings, no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def record_training(monkeypatch) -> list[dict]:
    """Replace the pipeline's training launcher by a stub that records each run's overrides and writes an
    empty export (``<checkpoint_dir>/final/config.json``), so stage logic runs without training."""
    from pathlib import Path

    import nemo_automodel_bard.pipeline.stages as stages

    runs: list[dict] = []

    def fake_training(yaml_path, overrides, launcher, log_file):
        runs.append({"_recipe": Path(yaml_path).name, **overrides})
        final = Path(overrides["checkpoint.checkpoint_dir"]) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")

    monkeypatch.setattr(stages, "run_recipe", fake_training)
    return runs


def toy_picture(width: int, height: int, color: tuple[int, int, int]):
    """A test picture: a coloured top half and a white lower-left quarter."""
    import numpy as np
    from PIL import Image

    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2] = color
    array[height // 2 :, : width // 2] = (250, 250, 250)
    return Image.fromarray(array)


#: (prompt, answer, picture) pairs the toy checkpoint of ``toy_model_dir`` has learnt
TOY_PAIRS = (
    ("Describe the image.", "red circle row 1 column 2, blue square row 2 column 3", (64, 64, (200, 30, 30))),
    ("List every shape.", "green triangle row 3 column 1, yellow star row 1 column 1", (128, 96, (30, 200, 30))),
    ("How many shapes are there?", "There are 4 shapes.", None),
)

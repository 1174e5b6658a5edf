"""The PBM recipe through NeMo's CLI entry point: ``torchrun -m nemo_automodel.cli.app cfg.yaml --a.b=c``.

One and two gloo processes (real FSDP2 sharding at two) on a fixed two-sample data set: one record
with an image, one text-only -- with ``shuffle: false`` the second rank only ever sees the text-only
record, so its micro-batches (training and validation) need the dummy image to keep the FSDP
collectives matched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PBM_B2 = ROOT / "recipes" / "tiny" / "pbm.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def fixed_data(tmp_path_factory):
    from nemo_automodel_bard.data.shapes import ShapesTask

    root = tmp_path_factory.mktemp("data")
    sample = ShapesTask(seed=0).sample("train", 0)
    sample.image.save(root / "grid.png")
    records = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "grid.png"},
                                                   {"type": "text", "text": sample.prompt}]},
                      {"role": "assistant", "content": sample.answer}]},
        {"messages": [{"role": "user", "content": "Repeat the list of shapes."},
                      {"role": "assistant", "content": sample.answer}]},
    ]  # fmt: skip
    path = root / "fixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _torchrun(nproc: int, tiny_model_dir: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    dataset = f"{{'_target_': 'nemo_automodel_bard.data.chat_dataset.ChatDataset', 'path': '{data}'}}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "nemo_automodel.cli.app", str(PBM_B2),
        f"--model.pretrained_model_name_or_path={tiny_model_dir}",
        f"--checkpoint.checkpoint_dir={out}",
        f"--dataset={dataset}",
        f"--validation_dataset={dataset}",  # the same two records, with noise fixed: a fixed batch
        "--step_scheduler.val_every_steps=1",
        "--dataloader.shuffle=false",
        f"--step_scheduler.max_steps={STEPS}",
        "--step_scheduler.global_batch_size=2",
        "--step_scheduler.local_batch_size=1",
        "--step_scheduler.ckpt_every_steps=100",
        "--dataloader.collate_fn.block_size=8",
        "--optimizer.lr=2e-3",
        "--bard.progress_bar=false",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def run_np1(tiny_model_dir, fixed_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("np1") / "ckpt"
    return out, _torchrun(1, tiny_model_dir, fixed_data, out)


@pytest.fixture(scope="module")
def run_np2(tiny_model_dir, fixed_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("np2") / "ckpt"
    return out, _torchrun(2, tiny_model_dir, fixed_data, out)


def _log(out: Path, name: str = "training.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_cli_run_trains_records_the_block_size_and_exports_a_complete_model(run_np1):
    out, _ = run_np1
    log = _log(out)
    assert [r["step"] for r in log] == list(range(STEPS))
    # the validation set is the same two records with a fixed corruption (epoch 0): a fixed batch
    val = [r["val_loss"] for r in _log(out, "validation.jsonl")]
    assert len(val) == STEPS
    assert all(b < a for a, b in zip(val, val[1:])) and val[-1] < 0.9 * val[0], val
    # the command-line override of the collator's block size (the YAML says 2) took effect
    assert {r["block_size"] for r in log} == {8}
    assert all(0.0 < r["mask_fraction"] < 1.0 and r["num_samples"] == 2 for r in log)
    for key in ("lr", "lr_language", "lr_merger", "lr_vision", "grad_norm", "tps"):
        assert all(key in r for r in log), key
    assert log[0]["lr_vision"] == pytest.approx(0.1 * log[0]["lr_language"])  # vision-tower group, lr_mult 0.1

    final = out / "final"
    info = json.loads((out / "export.json").read_text())
    assert Path(info["model_dir"]) == final.resolve() and info["block_size"] == 8 and info["steps"] == STEPS
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "bard_vl" and config["block_size"] == 8
    assert json.loads((final / "generation_config.json").read_text())["block_size"] == 8
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(final)
    assert model.config.block_size == 8
    assert AutoProcessor.from_pretrained(final).tokenizer.convert_tokens_to_ids("<|mask|>") == model.config.mask_token_id


@pytest.mark.slow
def test_two_gloo_processes_match_one(run_np1, run_np2):
    out1, _ = run_np1
    out2, result = run_np2
    assert "FSDPBardVLForConditionalGeneration" in result.stdout + result.stderr  # really sharded
    log1, log2 = _log(out1), _log(out2)
    assert len(log1) == len(log2) == STEPS
    val1, val2 = _log(out1, "validation.jsonl"), _log(out2, "validation.jsonl")
    for a, b in zip(val1, val2):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4, abs=1e-5)
    for a, b in zip(log1, log2):
        assert a["num_samples"] == b["num_samples"] == 2
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-5)


LORA = ["--peft._target_=nemo_automodel.components._peft.lora.PeftConfig",
        "--peft.target_modules=['*.language_model.layers.*.self_attn.*_proj', '*.language_model.layers.*.mlp.*_proj']",
        "--peft.dim=8", "--peft.alpha=16", "--optimizer.lr=1e-2", "--step_scheduler.val_every_steps=100"]


@pytest.mark.slow
def test_lora_under_two_gloo_processes_trains_and_exports_whole_adapters(tiny_model_dir, fixed_data, tmp_path):
    """``peft=lora`` under the pipeline's multi-process launcher (``torchrun --nproc-per-node=2``, FSDP2 over gloo):
    both ranks start from the base model (``B = 0``), rank 0 exports whole (gathered) adapters and the merged model
    ``W + (alpha / r) B A`` from them. NeMo seeds each rank with ``seed + rank``, so the second half of every
    ``lora_A`` (rank 1's shard) is a different random draw than in one process: a LoRA run depends on the
    process count, unlike a full one (docs/peft.md)."""
    from safetensors.torch import load_file

    from helpers import read_weights
    from nemo_automodel_bard.recipes.peft_export import lora_pairs

    outs = {n: tmp_path / f"np{n}" for n in (1, 2)}
    for nproc, out in outs.items():
        _torchrun(nproc, tiny_model_dir, fixed_data, out, *LORA, "--step_scheduler.max_steps=3")
    log1, log2 = _log(outs[1]), _log(outs[2])
    assert len(log1) == len(log2) == 3
    assert log2[0]["loss"] == pytest.approx(log1[0]["loss"], rel=1e-5)  # the same start: B = 0
    pairs = [lora_pairs(load_file(str(out / "adapter" / "adapter_model.safetensors"))) for out in outs.values()]
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert pairs[0].keys() == pairs[1].keys() and len(pairs[1]) == 7 * layers  # q/k/v/o, gate/up/down per layer
    for key, (a1, b1) in pairs[0].items():
        a2, b2 = pairs[1][key]
        assert a1.shape == a2.shape and b1.shape == b2.shape, key  # whole tensors, not one rank's shard
        half = a1.shape[0] // 2  # rank 0's rows of lora_A: its init is the one-process init (3 small steps apart)
        assert (a1[:half] - a2[:half]).abs().max() < 0.1 < (a1[half:] - a2[half:]).abs().max(), key
    base, merged = read_weights(Path(tiny_model_dir)), read_weights(outs[2] / "final")
    assert base.keys() == merged.keys()
    for key, value in base.items():
        expected = value + 2.0 * pairs[1][key][1] @ pairs[1][key][0] if key in pairs[1] else value  # alpha / r = 2
        assert torch.allclose(merged[key], expected, rtol=1e-5, atol=1e-6), key

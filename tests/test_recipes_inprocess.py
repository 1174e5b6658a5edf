"""Bard-VL recipes run in this process (one rank): resume, AR objective -> AR init -> PBM chain ->
decoding, clear config errors, and the dummy media that keep FSDP collectives matched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import QUICK_RECIPE, read_jsonl, read_weights

from nemo_automodel_bard.recipes.common import RecipeConfigError, load_recipe_config, run_recipe

ROOT = Path(__file__).resolve().parents[1]
PBM_B2 = ROOT / "recipes" / "tiny" / "pbm.yaml"
AR_YAML = ROOT / "recipes" / "tiny" / "ar_pretrain.yaml"
QUICK = QUICK_RECIPE
_weights, _jsonl = read_weights, read_jsonl


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=4", *QUICK]
    run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'a'}"])
    stopped = run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}", "--bard.stop_after_steps=2"])
    assert stopped.step_scheduler.step == 2
    checkpoint = tmp_path / "b" / "epoch_0_step_1"
    assert (checkpoint / "optim").is_dir() and (checkpoint / "model").is_dir()  # optimizer state is saved
    assert not (tmp_path / "b" / "final").exists()  # no export for an interrupted run
    # same command without the stop: NeMo resumes from LATEST and finishes the same schedule
    run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}"])
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = _jsonl(tmp_path / "a" / "training.jsonl"), _jsonl(tmp_path / "b" / "training.jsonl")
    assert [r["step"] for r in log_b] == [0, 1, 2, 3]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert [r["lr"] for r in log_a] == [r["lr"] for r in log_b]
    # cosine from 5e-4 to 5e-5 over the 4 steps (the YAML's warm-up is shortened to 4 // 10 = 0 steps),
    # stepped once per optimizer step; the vision tower's group runs at 0.1x
    import math

    expected = [5e-5 + 4.5e-4 * 0.5 * (1 + math.cos(math.pi * (s + 1) / 4)) for s in range(4)]
    assert [r["lr_language"] for r in log_a] == pytest.approx(expected, rel=1e-6)
    assert [r["lr_vision"] for r in log_a] == pytest.approx([0.1 * x for x in expected], rel=1e-6)


def test_dataloader_workers_train_exactly_as_the_main_process(tiny_model_dir, tmp_path):
    """Collation in worker processes (the host-side speed-up for GPU runs) sees the same noise draws:
    8 samples, 4 per step, 6 steps = 3 epochs, so the epoch reaching the workers' collator copies is
    exercised too (non-persistent workers copy it when each epoch's iterator starts)."""
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=6",
              "--step_scheduler.global_batch_size=4", "--step_scheduler.local_batch_size=4",
              "--step_scheduler.ckpt_every_steps=100", "--validation_dataset=None", "--dataset.size=8",
              "--bard.progress_bar=false"]
    losses = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        run_recipe(PBM_B2, [*common, f"--dataloader.num_workers={workers}", f"--checkpoint.checkpoint_dir={out}"])
        log = _jsonl(out / "training.jsonl")
        assert [r["epoch"] for r in log] == [0, 0, 1, 1, 2, 2]
        losses[workers] = [r["loss"] for r in log]
    assert losses[0] == losses[2]
    assert len(set(losses[0])) == 6  # every step saw a different batch or noise draw


@pytest.mark.slow
def test_ar_pretrain_then_chained_pbm_then_decoding(tmp_path):
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.data.shapes import ShapesTask

    ar = run_recipe(AR_YAML, [f"--checkpoint.checkpoint_dir={tmp_path / 'ar'}", "--step_scheduler.max_steps=2", *QUICK])
    assert ar.objective == "ar"
    ar_config = json.loads((tmp_path / "ar" / "final" / "config.json").read_text())
    assert ar_config["model_type"] == "qwen3_vl" and ar_config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert (tmp_path / "ar" / "final" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "ar" / "export.json").read_text())["objective"] == "ar"

    # the chain by hand: AR init, then the one PBM recipe at each block size from the previous export
    from nemo_automodel_bard.recipes.ar_init import convert_ar_to_bard

    previous = convert_ar_to_bard(tmp_path / "ar" / "final", tmp_path / "chain" / "ar_init", block_size=2)
    for block in (2, 4, 8, 16, 32):
        out = tmp_path / "chain" / f"pbm_b{block}"
        run_recipe(PBM_B2, [f"--model.pretrained_model_name_or_path={previous}", f"--checkpoint.checkpoint_dir={out}",
                            f"--dataloader.collate_fn.block_size={block}", "--step_scheduler.max_steps=1", *QUICK])
        previous = out / "final"
        assert json.loads((previous / "config.json").read_text())["block_size"] == block
        assert json.loads((previous / "generation_config.json").read_text())["block_size"] == block
    init = json.loads((tmp_path / "chain" / "ar_init" / "config.json").read_text())
    assert init["model_type"] == "bard_vl" and init["block_size"] == 2

    final = tmp_path / "chain" / "pbm_b32" / "final"
    model = BardVLForConditionalGeneration.from_pretrained(final, dtype=torch.float32, _attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(final)
    sample = ShapesTask(seed=0).sample("heldout", 0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[sample.image], return_tensors="pt")
    ids, stats = model.generate(batch, max_new_tokens=64, return_step_stats=True)  # defaults: B=32 from the export
    assert ids.shape[0] == 1 and 0 < ids.shape[1] <= 64
    assert stats["num_denoising_steps"] >= 1
    assert isinstance(processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0], str)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.pretrained_model_name_or_path=None", r"model\.pretrained_model_name_or_path is not set"),
        ("--model.pretrained_model_name_or_path=runs/does-not-exist/pbm_b2/final", r"does not exist \(has the previous stage"),
        ("--dataloader.collate_fn._target_=nemo_automodel_bard.recipes.collate.ar_collate_fn", "collate_fn must be"),
        ("--bard.stop_after_step=3", r"unknown key\(s\) in the `bard:` section"),
    ],
)
def test_config_errors_are_clear(tiny_model_dir, tmp_path, override, message):
    from nemo_automodel_bard.recipes.pbm import BardVLPBMRecipe

    overrides = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", f"--checkpoint.checkpoint_dir={tmp_path}", override]
    recipe = BardVLPBMRecipe(load_recipe_config(PBM_B2, overrides))
    with pytest.raises(RecipeConfigError, match=message):
        recipe.setup()


def test_a_qwen3_vl_directory_is_pointed_to_ar_init(tmp_path):
    from nemo_automodel_bard.fixtures.tiny import write_tiny_qwen3_vl
    from nemo_automodel_bard.recipes.pbm import BardVLPBMRecipe

    ar = write_tiny_qwen3_vl(tmp_path / "ar")
    recipe = BardVLPBMRecipe(load_recipe_config(PBM_B2, [f"--model.pretrained_model_name_or_path={ar}"]))
    with pytest.raises(RecipeConfigError, match=r"not 'bard_vl'.*recipes\.ar_init"):
        recipe.setup()


# ------------------------------------------------------------------------------------------ dummy media

TEXT_ONLY = [
    {"messages": [{"role": "user", "content": "Name two shapes."},
                  {"role": "assistant", "content": "red circle 1 1, blue cross 2 2."}], "index": 0},
    {"messages": [{"role": "user", "content": "And one more?"},
                  {"role": "assistant", "content": "green square 3 3."}], "index": 1},
]  # fmt: skip


def test_a_dummy_image_keeps_text_only_batches_exact(tiny_model_dir, tiny_processor):
    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.objectives.block_diffusion import diffusion_training_loss
    from nemo_automodel_bard.recipes.collate import NemoDiffusionCollate

    model = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = NemoDiffusionCollate(tiny_processor, block_size=4, ensure_image=False)(TEXT_ONLY)
    padded = NemoDiffusionCollate(tiny_processor, block_size=4, ensure_video=True)(TEXT_ONLY)
    assert "pixel_values" not in plain
    assert padded["num_dummy_media"] == 2 and "pixel_values" in padded and "pixel_values_videos" in padded
    assert torch.equal(plain["input_ids"].flatten()[plain["loss_positions"]], padded["input_ids"].flatten()[padded["loss_positions"]])

    def loss_and_grads(batch):
        model.zero_grad()
        loss, _ = diffusion_training_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads(plain)
    loss_padded, grads_padded = loss_and_grads(padded)
    torch.testing.assert_close(loss_padded, loss_plain, rtol=1e-6, atol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_padded[name], grad, rtol=1e-4, atol=1e-6)
    vision = [g for n, g in grads_padded.items() if ".visual." in n]
    assert vision and all(float(g.abs().max()) == 0.0 for g in vision)  # the vision tower ran, gradient 0

    # every sample skipped: one row holding only the dummy image; a zero loss that still backpropagates
    empty = NemoDiffusionCollate(tiny_processor, block_size=4)([{"index": 5, "error": "line 6: invalid JSON"}])
    assert empty["num_samples"] == 0 and empty["input_ids"].shape[0] == 1 and "pixel_values" in empty
    loss, _ = diffusion_training_loss(model, empty)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_ar_collator_dummy_image_does_not_change_the_loss(tiny_processor):
    import torch.nn.functional as F

    from nemo_automodel_bard.data.ar_collator import MODEL_INPUTS
    from nemo_automodel_bard.recipes.collate import NemoARCollate
    from nemo_automodel_bard.recipes.model_builder import build_qwen3_vl_ar

    model = build_qwen3_vl_ar(tiny={}).eval()

    def loss(batch):
        logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")

    plain = NemoARCollate(tiny_processor, ensure_image=False)(TEXT_ONLY)
    padded = NemoARCollate(tiny_processor)(TEXT_ONLY)
    assert "pixel_values" in padded and padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert int((plain["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    with torch.no_grad():
        torch.testing.assert_close(loss(padded), loss(plain), rtol=1e-5, atol=1e-5)

"""Certainty-forcing self-distillation: the loss term, the trajectory file, the recipe (train, resume) and the
pipeline stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUICK_RECIPE, TOY_PAIRS, read_jsonl, read_weights, record_training, toy_picture

from nemo_automodel_bard.data.chat_dataset import ChatDataset, shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.diffusion.losses import certainty_entropy, reduce_token_losses
from nemo_automodel_bard.objectives.block_diffusion import build_training_mask, diffusion_training_loss
from nemo_automodel_bard.pipeline.trajectories import write_trajectories
from nemo_automodel_bard.recipes.common import RecipeConfigError, run_recipe

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "recipes" / "tiny" / "pbm.yaml"  # self-distillation: the PBM recipe with bard.certainty_weight


# ------------------------------------------------------------------------------------------ the loss term
def test_certainty_entropy_is_the_entropy_where_the_argmax_is_right_and_zero_elsewhere():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 5.0]])
    targets = torch.tensor([0, 2, 2])  # right, wrong, right
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum(-1)
    expected = entropy * torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(certainty_entropy(logits, targets), expected)
    # a sure prediction has (almost) no entropy left to remove
    assert float(certainty_entropy(torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([0]))) < 1e-6


@pytest.fixture(scope="module")
def batch(tiny_processor):
    ds = shapes_dataset("train", size=3, seed=0)
    return BardVLCollator(processor=tiny_processor, block_size=4, seed=0)([ds[i] for i in range(3)])


def test_zero_weight_is_the_plain_objective_and_the_term_adds_the_reduced_entropy(tiny_model, batch):
    with torch.no_grad():
        plain, m0 = diffusion_training_loss(tiny_model, batch)
        zero, _ = diffusion_training_loss(tiny_model, batch, certainty_weight=0.0)
        assert torch.equal(plain, zero)
        # make some positions right: the tiny random model rarely is
        forced = dict(batch)
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=build_training_mask(tiny_model, batch),
                            position_ids=batch["position_ids"], logits_positions=batch["loss_positions"],
                            **{k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}).logits
        forced["loss_targets"] = torch.where(torch.arange(len(batch["loss_targets"])) % 2 == 0,
                                             logits.argmax(-1), batch["loss_targets"])
        base, _ = diffusion_training_loss(tiny_model, forced)
        with_term, metrics = diffusion_training_loss(tiny_model, forced, certainty_weight=0.5)
    term = certainty_entropy(logits, forced["loss_targets"])
    assert int((term > 0).sum()) >= len(term) // 2
    expected = base + 0.5 * reduce_token_losses(term, "sample_mean", forced["loss_sample_index"],
                                                forced["loss_normalizer"], None)
    torch.testing.assert_close(with_term, expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["certainty"]) > 0
    assert torch.equal(metrics["ce"], diffusion_training_loss(tiny_model, forced)[1]["ce"])  # CE is logged alone


# ------------------------------------------------------------------------------------------ trajectories
def _toy_records():
    records = []
    for prompt, answer, pic in TOY_PAIRS:
        content = ([{"type": "image", "image": toy_picture(*pic)}] if pic else []) + [{"type": "text", "text": prompt}]
        records.append({"messages": [{"role": "user", "content": content},
                                     {"role": "assistant", "content": answer}]})
    wrong = dict(records[0])
    wrong["messages"] = [records[0]["messages"][0], {"role": "assistant", "content": "a reference it does not give"}]
    broken = {"messages": [{"role": "user", "content": "no answer here"}]}
    return [*records, wrong, broken]


def test_trajectories_keep_the_right_answers_as_chat_records(toy_model_dir, tmp_path):
    records = _toy_records()
    summary = write_trajectories(toy_model_dir, records, tmp_path / "t", data_kind="jsonl", block_size=4,
                                 max_new_tokens=40, keep="matching", device="cpu")
    assert summary["num_decoded"] == 4 and summary["num_unusable"] == 1
    assert "no assistant turn" in summary["unusable_records"][0]["reason"]
    assert summary["num_kept"] == 3 and summary["accuracy"] == pytest.approx(0.75)
    written = ChatDataset(summary["path"], strict=True)
    assert len(written) == 3
    for i, (prompt, answer, pic) in enumerate(TOY_PAIRS):
        messages = written[i]["messages"]
        assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        user = messages[0]["content"]
        assert user[-1]["text"] == prompt
        if pic:  # the in-memory picture went to a PNG beside the file, pixel for pixel
            from PIL import Image

            stored = np.asarray(Image.open(user[0]["image"]).convert("RGB"))
            assert np.array_equal(stored, np.asarray(toy_picture(*pic)))
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["num_kept"] == 3

    every = write_trajectories(toy_model_dir, records, tmp_path / "all", data_kind="jsonl", block_size=4,
                               max_new_tokens=40, keep="all", device="cpu")
    assert every["num_kept"] == 4  # the wrong reference's record now holds the model's own answer
    assert read_jsonl(every["path"])[3]["messages"][-1]["content"][0]["text"] == TOY_PAIRS[0][1]
    with pytest.raises(ValueError, match="keep must be one of"):
        write_trajectories(toy_model_dir, records, tmp_path / "x", keep="some")


# ------------------------------------------------------------------------------------------ recipe
def _trajectory_file(tmp_path: Path, n: int = 8) -> Path:
    """Shapes records with their own answers (what a perfect model would keep) as a chat JSONL."""
    from nemo_automodel_bard.pipeline.trajectories import _portable

    ds = shapes_dataset("train", size=n, seed=0)
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "trajectories.jsonl"
    with path.open("w") as f:
        for i in range(n):
            messages = ds[i]["messages"]
            f.write(json.dumps({"messages": _portable(messages[:-1], tmp_path / "images", f"{i}") + messages[-1:]}) + "\n")
    return path


def test_recipe_trains_resumes_and_leaves_its_source_untouched(tiny_model_dir, tmp_path):
    data = _trajectory_file(tmp_path / "data")
    weights = Path(tiny_model_dir) / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=4",
              "--dataset._target_=nemo_automodel_bard.data.factory.make_dataset", "--dataset.kind=jsonl",
              f"--dataset.path={data}", "--dataloader.collate_fn.block_size=4", "--bard.certainty_weight=1.0",
              *QUICK_RECIPE]
    run_recipe(YAML, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'a'}"])
    stopped = run_recipe(YAML, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}", "--bard.stop_after_steps=2"])
    assert stopped.step_scheduler.step == 2
    run_recipe(YAML, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}"])  # resumes from step 2
    a, b = read_weights(tmp_path / "a" / "final"), read_weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_jsonl(tmp_path / "a" / "training.jsonl"), read_jsonl(tmp_path / "b" / "training.jsonl")
    assert [r["step"] for r in log_b] == [0, 1, 2, 3] and [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert all(r["certainty_weight"] == 1.0 for r in log_a)
    config = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert config["block_size"] == 4 and config["model_type"] == "bard_vl"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before  # the model before the stage is unchanged
    # a zero weight is the plain PBM objective on the same batches: the same first CE, a loss no larger
    run_recipe(YAML, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'c'}", "--bard.certainty_weight=0"])
    log_c = read_jsonl(tmp_path / "c" / "training.jsonl")
    assert log_c[0]["ce"] == log_a[0]["ce"] and log_c[0]["loss"] <= log_a[0]["loss"]
    assert all("certainty_weight" not in r for r in log_c)  # the PBM objective logs no certainty weight


def test_recipe_refuses_a_negative_certainty_weight(tiny_model_dir, tmp_path):
    with pytest.raises(RecipeConfigError, match="bard.certainty_weight must be a finite number >= 0"):
        run_recipe(YAML, [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--bard.certainty_weight=-1",
                          f"--checkpoint.checkpoint_dir={tmp_path}", *QUICK_RECIPE])


# ------------------------------------------------------------------------------------------ pipeline stage
def test_stage_decodes_its_own_stream_and_trains_on_the_kept_answers(tmp_path, monkeypatch):
    from test_pipeline_seeds import _ctx

    import nemo_automodel_bard.pipeline.stages as stages
    import nemo_automodel_bard.pipeline.trajectories as trajectories

    runs = record_training(monkeypatch)
    seen = {}

    def fake_write(model_dir, records, out_dir, **kwargs):
        records = list(records)
        seen.update(model_dir=model_dir, n=len(records), first=records[0]["index"], **kwargs)
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "trajectories.jsonl").write_text("")
        return {"path": str(Path(out_dir) / "trajectories.jsonl"), "num_kept": 1, "num_decoded": len(records),
                "accuracy": 1.0, "tokens_per_forward": 1.0}

    monkeypatch.setattr(trajectories, "write_trajectories", fake_write)
    ctx = _ctx(tmp_path, ["data=shapes", "self_distill.max_steps=3"])
    ctx.outputs["pbm"] = {"b32_dir": str(tmp_path / "b32")}
    out = stages.stage_self_distill(ctx)
    (run,) = runs
    assert seen["model_dir"] == str(tmp_path / "b32") and seen["n"] == 3 * 32  # the images it trains on
    assert seen["block_size"] == 32 and seen["threshold"] == 0.9 and seen["keep"] == "matching"
    assert run["model.pretrained_model_name_or_path"] == str(tmp_path / "b32")
    assert run["dataset.kind"] == "jsonl" and run["dataset.path"] == out["trajectories"]
    assert run["bard.certainty_weight"] == 1.0 and run["step_scheduler.max_steps"] == 3
    assert run["_recipe"] == "pbm.yaml" and run["optimizer.lr"] == 2.0e-4  # PBM's recipe, the stage's own lr
    assert run["dataloader.collate_fn.max_loss_weight"] == 10.0  # the PBM objective's options at B=32
    assert "dataloader.collate_fn.complementary" not in run
    # the prompts are a stream of their own: no other stage trains on them
    assert seen["first"] == stages.stream_offset(0, "self_distill")
    # a re-run finds both steps done
    runs.clear()
    seen.clear()
    assert stages.stage_self_distill(ctx)["model_dir"] == out["model_dir"]
    assert not runs and not seen
    # fewer prompts than the stage's images
    other = tmp_path / "fewer"
    other.mkdir()
    ctx = _ctx(other, ["data=shapes", "self_distill.max_steps=3", "self_distill.num_prompts=40"])
    ctx.outputs["pbm"] = {"b32_dir": str(tmp_path / "b32")}
    stages.stage_self_distill(ctx)
    assert seen["n"] == 40


@pytest.mark.parametrize("overrides, message", [
    (["self_distill.source=teacher"], "self_distill.source must be 'pbm' or 'swd_kd'"),
    (["self_distill.block_size=64"], r"self_distill.block_size=64 has no PBM stage"),
    (["self_distill.keep=most"], "self_distill.keep must be 'matching' or 'all'"),
    (["self_distill.certainty_weight=-1"], "self_distill.certainty_weight must be a number >= 0"),
    (["self_distill.source=swd_kd", "self_distill.block_size=8"], "needs a B=8 SWD student"),
])
def test_stage_config_errors_are_clear(tmp_path, overrides, message):
    from test_pipeline import _config

    from nemo_automodel_bard.pipeline.app import run_pipeline
    from nemo_automodel_bard.pipeline.validate import PipelineConfigError

    cfg = _config(tmp_path, ["data=shapes", "stages=[ar_pretrain,ar_init,pbm,swd,self_distill]", *overrides])
    with pytest.raises(PipelineConfigError, match=message):
        run_pipeline(cfg)

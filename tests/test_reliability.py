"""Bad inputs and faults, table-driven: each ends in a clear error naming the record / file / key before any
work, or in a counted skip with its reason -- never a crash deep inside a library or a silent wrong result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from nemo_automodel_bard.data.ar_collator import ARChatCollator
from nemo_automodel_bard.data.chat_dataset import ChatDataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.pipeline.app import config_dir, run_pipeline
from nemo_automodel_bard.pipeline.validate import PipelineConfigError

ROOT = Path(__file__).resolve().parents[1]


def _chat(user, answer="red circle 1 1.", system=None):
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "index": 0}


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "ok.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return str(path)


def _with_image(path, text="What is there?", answer="red circle 1 1."):
    return _chat([{"type": "image", "image": path}, {"type": "text", "text": text}], answer)


# (case, record builder, reason the skip must name)
COLLATOR_CASES = [
    ("image placeholder typed into the prompt", lambda img: _chat("look <|image_pad|> here"), "placeholder/feature mismatch"),
    ("placeholder next to a real image", lambda img: _with_image(img, "and <|image_pad|>"), "placeholder/feature mismatch"),
    ("EOS marker inside the answer", lambda img: _chat("hi", "red <|im_end|> circle"), "special token"),
    ("MASK token inside the answer", lambda img: _chat("hi", "red <|mask|> circle"), "special token"),
    ("vision start inside the answer", lambda img: _chat("hi", "a <|vision_start|> b"), "special token"),
    ("chat marker inside the answer", lambda img: _chat("hi", "a <|im_start|> b"), "special token"),
    ("missing image file", lambda img: _with_image("/no/such/image.png"), "/no/such/image.png"),
    ("empty answer", lambda img: _chat("hi", "   "), "empty response"),
    ("no assistant turn", lambda img: _chat("hi", None), "assistant"),
    ("unknown role", lambda img: {"messages": [{"role": "robot", "content": "x"},
                                               {"role": "assistant", "content": "y"}], "index": 0}, "role"),
    ("content item not an object", lambda img: _chat(["not a dict"]), "content"),
    ("record is not an object", lambda img: ["messages"], "messages"),
]


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
@pytest.mark.parametrize("case, build, reason", COLLATOR_CASES, ids=[c[0] for c in COLLATOR_CASES])
def test_bad_records_are_counted_skips_with_their_reason(tiny_processor, image_path, kind, case, build, reason):
    collator = (BardVLCollator(processor=tiny_processor, block_size=4) if kind == "diffusion"
                else ARChatCollator(tiny_processor))
    good = _with_image(image_path)
    batch = collator([build(image_path), good])
    assert batch["num_skipped"] == 1 and batch["num_samples"] == 1, case
    (index, why), = batch["skipped"]
    assert reason in why, (case, why)


def _collator(kind, processor):
    return BardVLCollator(processor=processor, block_size=4) if kind == "diffusion" else ARChatCollator(processor)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    """A real 8-frame H.264 MP4 (64x64, 4 fps) written with PyAV."""
    import av
    import numpy as np

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(8):
            frame = np.full((64, 64, 3), 30 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


MEDIA_SKIP_CASES = [
    ("huge image file", lambda tmp: _huge_png(tmp), "megapixels"),
    ("max_pixels not a number", lambda tmp: {"max_pixels": "lots"}, "max_pixels must be a positive integer"),
    ("min_pixels above max_pixels", lambda tmp: {"min_pixels": 10**6, "max_pixels": 10**4}, "is above max_pixels"),
    ("extreme aspect ratio", lambda tmp: {"resized_height": 32, "resized_width": 32 * 300}, "cannot resize"),
]


def _huge_png(tmp):
    path = tmp / "huge.png"
    if not path.exists():
        Image.new("L", (9000, 9000)).save(path)  # 81 megapixels in ~80 KB
    return {"image": str(path)}


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
@pytest.mark.parametrize("case, item, reason", MEDIA_SKIP_CASES, ids=[c[0] for c in MEDIA_SKIP_CASES])
def test_bad_media_items_are_counted_skips(tiny_processor, image_path, tmp_path_factory, kind, case, item, reason):
    tmp = tmp_path_factory.mktemp("media")
    record = _chat([{"type": "image", "image": image_path, **item(tmp)}, {"type": "text", "text": "what?"}])
    start = time.perf_counter()
    batch = _collator(kind, tiny_processor)([record, _with_image(image_path)])
    assert batch["num_skipped"] == 1 and reason in batch["skipped"][0][1], (case, batch["skipped"])
    assert time.perf_counter() - start < 5, "the huge image was decoded"


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_per_image_pixel_limits_are_applied(tiny_processor, tmp_path, kind):
    big = tmp_path / "big.png"
    Image.new("RGB", (256, 256), (10, 200, 10)).save(big)
    collator = _collator(kind, tiny_processor)

    def grid(**keys):
        batch = collator([_chat([{"type": "image", "image": str(big), **keys}, {"type": "text", "text": "?"}])])
        assert batch["num_samples"] == 1, batch["skipped"]
        return batch["image_grid_thw"][0].tolist()

    factor = tiny_processor.image_processor.patch_size * tiny_processor.image_processor.merge_size
    full = grid()
    capped = grid(max_pixels=64 * 64)
    exact = grid(resized_height=2 * factor, resized_width=3 * factor)
    assert full[1] * full[2] > capped[1] * capped[2]
    assert capped[1] * capped[2] * tiny_processor.image_processor.patch_size ** 2 <= 64 * 64
    assert exact == [1, 2 * tiny_processor.image_processor.merge_size, 3 * tiny_processor.image_processor.merge_size]


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_video_files_are_decoded(tiny_processor, video_path, kind):
    collator = _collator(kind, tiny_processor)
    record = _chat([{"type": "video", "video": video_path, "fps": 2.0}, {"type": "text", "text": "what happens?"}])
    batch = collator([record])
    assert batch["num_samples"] == 1, batch["skipped"]
    frames = batch["video_grid_thw"][0].tolist()[0]
    assert frames >= 1 and batch["pixel_values_videos"].shape[0] > 0
    broken = Path(video_path).with_name("broken.mp4")
    broken.write_bytes(b"not a video at all")
    batch = collator([_chat([{"type": "video", "video": str(broken)}, {"type": "text", "text": "?"}]), record])
    assert batch["num_skipped"] == 1 and "unreadable video file" in batch["skipped"][0][1]


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_too_long_records_are_skipped_or_cut(tiny_processor, kind):
    long_prompt = _chat("word " * 400)
    if kind == "diffusion":
        collator = BardVLCollator(processor=tiny_processor, block_size=4, max_length=64)
    else:
        collator = ARChatCollator(tiny_processor, max_length=64)
    batch = collator([long_prompt])
    assert batch["num_skipped"] == 1 and "too long" in batch["skipped"][0][1]
    long_answer = _chat("hi", "red circle 1 1, " * 100)
    batch = collator([long_answer])
    assert batch["num_samples"] == 1 and batch["input_ids"].shape[1] <= 64


def test_tiny_recipes_limit_the_row_length():
    import yaml

    for path in sorted((ROOT / "recipes" / "tiny").glob("*.yaml")):
        collate = yaml.safe_load(path.read_text())["dataloader"]["collate_fn"]
        assert isinstance(collate.get("max_length"), int), path.name


# ------------------------------------------------------------------------------------------------ data files
def test_data_files(tmp_path, image_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl' holds no records"):
        ChatDataset(empty)

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes("\ufeff".encode() + (json.dumps(_chat("hi")) + "\n").encode() * 2)
    ds = ChatDataset(bom)
    assert ds[0]["messages"][0]["content"] == "hi" and ds.num_invalid == 0

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(_chat("hi")) + "\n{not json\n[1, 2]\n")
    ds = ChatDataset(broken)
    assert "broken.jsonl line 2: invalid JSON" in ds[1]["error"]
    assert "line 3" in ds[2]["error"] and "JSON object" in ds[2]["error"]
    with pytest.raises(ValueError, match="record 1"):
        ChatDataset(broken, strict=True)[1]

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    openai = tmp_path / "openai.jsonl"
    openai.write_text(json.dumps(_chat([{"type": "image_url", "image_url": {"url": "images/a.png"}},
                                        {"type": "text", "text": "x"}])) + "\n")
    item = ChatDataset(openai)[0]["messages"][0]["content"][0]
    assert item["image_url"]["url"] == str(tmp_path / "images" / "a.png")

    with pytest.raises(FileNotFoundError, match="neither a JSONL file"):
        ChatDataset(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ config
def _write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


EVAL_CASES = [
    ("answerless record", lambda img: [_chat("hi", None)], "record 0: no assistant turn"),
    ("missing image", lambda img: [_with_image("/no/such/eval.png")], "/no/such/eval.png"),
    ("non-string text", lambda img: [_chat([{"type": "text", "text": 5}])], "text must be a string"),
    ("broken JSON line", None, "invalid JSON"),
    ("empty answer", lambda img: [_chat("hi", " ")], "reference answer is empty"),
]


@pytest.mark.parametrize("case, build, message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_held_out_records_stop_before_any_training(tmp_path, image_path, case, build, message):
    train = _write_jsonl(tmp_path / "train.jsonl", [_with_image(image_path)])
    eval_path = tmp_path / "eval.jsonl"
    if build is None:
        eval_path.write_text("{oops\n")
    else:
        _write_jsonl(eval_path, build(image_path))
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path / 'run'}", "data=jsonl",
                                                        f"data.path={train}", f"data.eval_path={eval_path}"])
    with pytest.raises(PipelineConfigError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists()


CONFIG_CASES = [
    (["evaluate.thresholds=[1.2]"], r"evaluate.thresholds: 1.2 is not a confidence threshold"),
    (["evaluate.thresholds=[0]"], r"evaluate.thresholds: 0 is not a confidence threshold"),
    (["evaluate.batch_size=0"], "evaluate.batch_size must be a positive integer"),
    (["evaluate.num_samples=0"], "evaluate.num_samples must be a positive integer"),
    (["evaluate.max_new_tokens=-3"], "evaluate.max_new_tokens must be a positive integer"),
    (["evaluate.denoising_steps=0"], "evaluate.denoising_steps must be a positive integer"),
    (["evaluate.remasking_strategy=bogus"], "evaluate.remasking_strategy: unknown remasking_strategy 'bogus'"),
    (["seed=-1"], "seed must be a non-negative integer"),
    (["threads=0"], "threads must be a positive integer"),
    (["pbm.max_loss_weight=0"], "pbm.max_loss_weight must be a positive number"),
    (["data=jsonl", "data.path=/no/such.jsonl"], "data.path: /no/such.jsonl does not exist"),
    (["pbm.block_sizes=[]"], "pbm.block_sizes: empty"),
    (["swd.direction=sideways"], "swd.direction must be 'forward' or 'reverse'"),
    (["swd.anchor=random"], "swd.anchor must be 'teacher', 'fixed' or 'previous'"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_settings_stop_before_any_work(tmp_path, overrides, message):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path}", *overrides])
    with pytest.raises(PipelineConfigError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------ training
def test_a_run_without_usable_samples_stops_and_exports_nothing(tiny_model_dir, tmp_path):
    from nemo_automodel_bard.recipes.common import NoUsableSamplesError, run_recipe

    bad = _write_jsonl(tmp_path / "bad.jsonl", [_with_image(f"/missing/{i}.png") for i in range(8)])
    out = tmp_path / "run"
    with pytest.raises(NoUsableSamplesError, match=r"without a single usable training sample .*record \d+: .*missing"):
        run_recipe(ROOT / "recipes" / "tiny" / "pbm.yaml", [
            f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=3",
            "--step_scheduler.global_batch_size=4", "--step_scheduler.local_batch_size=4",
            "--step_scheduler.ckpt_every_steps=100", "--validation_dataset=None", "--bard.progress_bar=false",
            "--dataset._target_=nemo_automodel_bard.data.factory.make_dataset", "--dataset.kind=jsonl",
            f"--dataset.path={bad}",
            f"--checkpoint.checkpoint_dir={out}"])
    assert not (out / "final").exists() and not (out / "export.json").exists()


_KILL_CHILD = r"""
import sys, logging
logging.basicConfig(level=logging.WARNING)
from nemo_automodel_bard.recipes.common import run_recipe
run_recipe(sys.argv[1], sys.argv[2:])
"""


@pytest.mark.slow
def test_training_log_survives_a_kill_after_a_checkpoint(tiny_model_dir, tmp_path):
    """kill -9 after the step-5 checkpoint: training.jsonl holds every step up to it (NeMo buffers 100 records;
    the checkpoint flushes them), so a resumed run's log and the report's loss curve are complete."""
    out = tmp_path / "run"
    args = [str(ROOT / "recipes" / "tiny" / "pbm.yaml"), f"--model.pretrained_model_name_or_path={tiny_model_dir}",
            "--step_scheduler.max_steps=400", "--step_scheduler.global_batch_size=2",
            "--step_scheduler.local_batch_size=2", "--step_scheduler.ckpt_every_steps=5",
            "--validation_dataset=None", "--bard.progress_bar=false", "--dataset.size=64",
            f"--checkpoint.checkpoint_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "epoch_0_step_9").exists():
            time.sleep(0.2)
        assert (out / "epoch_0_step_9").exists(), "no checkpoint within 240 s"
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    steps = [json.loads(line)["step"] for line in (out / "training.jsonl").read_text().splitlines()]
    assert steps[:10] == list(range(10))


def test_the_documented_override_syntax_composes(tmp_path):
    """docs/pipeline.md's example of a stage's recipe override is accepted by Hydra and reaches the config."""
    text = (ROOT / "docs" / "pipeline.md").read_text()
    line = next(line for line in text.splitlines() if "pbm.overrides=" in line)
    override = line.split("bard-vl ", 1)[1].split("#")[0].strip().replace("'", "")
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=[f"work_dir={tmp_path}", override])
    assert cfg.pbm.overrides["optimizer.lr"] == 1e-3


# ------------------------------------------------------------------------------------------------ generate
GENERATE_CASES = [
    ("empty batch", lambda b: {**b, "input_ids": b["input_ids"][:0], "attention_mask": b["attention_mask"][:0]},
     "empty batch"),
    ("id outside the vocabulary", lambda b: {**b, "input_ids": b["input_ids"].clone().fill_(10**6)},
     "outside the model's vocabulary"),
    ("image placeholders without pixels", lambda b: {k: v for k, v in b.items() if k != "pixel_values"},
     "image placeholder tokens but no pixel_values"),
    ("pixels without placeholders", lambda b: {**b, "input_ids": b["input_ids"].masked_fill(
        b["input_ids"] == b["_image_token"], 5)}, "no image placeholder tokens"),
    ("pixels without their grid", lambda b: {k: v for k, v in b.items() if k != "image_grid_thw"},
     "need image_grid_thw"),
]


@pytest.mark.parametrize("case, corrupt, message", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_refuses_inconsistent_inputs(tiny_model_dir, tiny_processor, image_path, case, corrupt, message):
    import torch

    from nemo_automodel_bard import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    text = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = dict(tiny_processor(text=[text], images=[Image.open(image_path)], return_tensors="pt"))
    batch["_image_token"] = model.config.image_token_id
    bad = {k: v for k, v in corrupt(batch).items() if not k.startswith("_")}
    with pytest.raises(ValueError, match=message):
        model.generate(bad, max_new_tokens=4, block_size=4)


# ------------------------------------------------------------------------------------------------ loading
def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return Path(dst)


def _pickle_only(d):
    import torch
    from safetensors.torch import load_file

    weights = {}
    for f in d.glob("*.safetensors"):
        weights.update(load_file(f))
        f.unlink()
    for f in d.glob("*.safetensors.index.json"):
        f.unlink()
    torch.save(weights, d / "pytorch_model.bin")


def _llama_config(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate_weights(d):
    f = sorted(d.glob("*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _garbage_header(d):
    f = sorted(d.glob("*.safetensors"))[0]
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)


LOAD_CASES = [
    ("pickle weights only", _pickle_only, ValueError, "holds only pickle weights"),
    ("config of another model type", _llama_config, ValueError, "model_type 'llama'"),
    ("truncated safetensors file", _truncate_weights, OSError, r"\.safetensors: cannot read"),
    ("safetensors file with a garbage header", _garbage_header, OSError, r"\.safetensors: cannot read"),
]


@pytest.mark.parametrize("case, corrupt, error, message", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_from_pretrained_refuses_unsafe_or_broken_directories(tiny_model_dir, tmp_path, case, corrupt, error, message):
    import torch

    from nemo_automodel_bard import BardVLForConditionalGeneration

    d = _copy_model(tiny_model_dir, tmp_path / "model")
    corrupt(d)
    with pytest.raises(error, match=message):
        BardVLForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32)


def test_pickle_weights_load_only_when_asked(tiny_model_dir, tmp_path):
    import torch

    from nemo_automodel_bard import BardVLForConditionalGeneration

    reference = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    d = _copy_model(tiny_model_dir, tmp_path / "model")
    _pickle_only(d)
    loaded = BardVLForConditionalGeneration.from_pretrained(str(d), dtype=torch.float32, use_safetensors=False)
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_confidence_threshold_outside_the_unit_interval_is_refused(tiny_model_dir, threshold):
    import torch

    from nemo_automodel_bard import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\]"):
        model.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=4, block_size=4,
                       confidence_threshold=threshold)


# ------------------------------------------------------------------------------------------------ checkpoints
def _drop_optimizer_index(checkpoint):
    (checkpoint / "optim" / ".metadata").unlink()


def _truncate_model_shard(checkpoint):
    shard = sorted((checkpoint / "model").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


def _drop_scheduler_state(checkpoint):
    (checkpoint / "step_scheduler.pt").unlink()


@pytest.mark.parametrize("damage", [_drop_optimizer_index, _truncate_model_shard, _drop_scheduler_state],
                         ids=["optimizer index missing", "model shard truncated", "scheduler state missing"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, damage):
    """The latest checkpoint is damaged although no interrupted-save marker says so: the resume skips it for the
    previous one, trains the lost steps again and ends with the uninterrupted run's weights."""
    import torch

    from helpers import QUICK_RECIPE, read_jsonl, read_weights
    from nemo_automodel_bard.recipes.common import run_recipe

    pbm = ROOT / "recipes" / "tiny" / "pbm.yaml"
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=6",
              *QUICK_RECIPE, "--step_scheduler.ckpt_every_steps=2"]
    run_recipe(pbm, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'a'}"])
    run_recipe(pbm, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}", "--bard.stop_after_steps=4"])
    latest = tmp_path / "b" / "epoch_0_step_3"
    assert latest.is_dir() and (tmp_path / "b" / "epoch_0_step_1").is_dir()
    damage(latest)
    run_recipe(pbm, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}"])
    a, b = read_weights(tmp_path / "a" / "final"), read_weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "b" / "training.jsonl")}
    assert [losses[s] for s in range(6)] == [r["loss"] for r in read_jsonl(tmp_path / "a" / "training.jsonl")]


_KILL_DURING_SAVE_CHILD = r"""
import os, signal, sys
from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
from nemo_automodel_bard.recipes.common import run_recipe

save_optimizer = Checkpointer.save_optimizer

def save_then_die(self, *args, **kwargs):  # the model shards of step 3 are on disk, the optimizer's are not
    if any("step_3" in str(a) for a in list(args) + list(kwargs.values())):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_optimizer(self, *args, **kwargs)

Checkpointer.save_optimizer = save_then_die
run_recipe(sys.argv[1], sys.argv[2:])
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_resumes_bit_identically(tiny_model_dir, tmp_path):
    """SIGKILL in the middle of writing the step-3 checkpoint (model written, optimizer not): the same command
    resumes from the step-1 checkpoint and ends with the uninterrupted run's weights and a complete log."""
    import torch

    from helpers import QUICK_RECIPE, read_jsonl, read_weights

    pbm = str(ROOT / "recipes" / "tiny" / "pbm.yaml")
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=6",
              *QUICK_RECIPE, "--step_scheduler.ckpt_every_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run in a child with the same numerics

    def run(script, out):
        return subprocess.run([sys.executable, "-c", script, pbm, *common, f"--checkpoint.checkpoint_dir={out}"],
                              env=env, capture_output=True, timeout=600)

    assert run(_KILL_CHILD, tmp_path / "a").returncode == 0
    child = run(_KILL_DURING_SAVE_CHILD, tmp_path / "b")
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert (tmp_path / "b" / "epoch_0_step_1").is_dir() and not (tmp_path / "b" / "final").exists()
    resumed = run(_KILL_CHILD, tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_weights(tmp_path / "a" / "final"), read_weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "b" / "training.jsonl")}
    assert [losses[s] for s in range(6)] == [r["loss"] for r in read_jsonl(tmp_path / "a" / "training.jsonl")]

"""The lmms-eval plugin: its batched core (always), and lmms-eval end to end on the tiny task (when installed)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import TOY_PAIRS, toy_picture

from nemo_automodel_bard.evaluation.batched import BatchedBardVL, EvalItem
from nemo_automodel_bard.evaluation.tiny_task import write_tiny_task

ROOT = Path(__file__).resolve().parents[1]


def _items(n: int = 6, **gen_kwargs) -> list[EvalItem]:
    items = []
    for k in range(n):
        prompt, _, pic = TOY_PAIRS[k % 3]
        visuals = [toy_picture(*pic)] if pic else []
        items.append(EvalItem(context=prompt, visuals=lambda v=visuals: v, gen_kwargs=dict(gen_kwargs)))
    return items


def test_batched_answers_equal_unbatched_and_speed_is_reported(loaded, toy_model_dir, tmp_path):
    model, processor = loaded
    runs = {}
    for batch_size in (1, 4):
        bard = BatchedBardVL(str(toy_model_dir), batch_size=batch_size, system_prompt="", model=model,
                             processor=processor, block_size=4, stats_path=str(tmp_path / "stats.jsonl"))
        results = bard.generate(_items(max_new_tokens=48))
        assert [r["text"] for r in results] == [TOY_PAIRS[k % 3][1] for k in range(6)]
        runs[batch_size] = (results, bard.runs[-1])
    assert [r["output_tokens"] for r in runs[1][0]] == [r["output_tokens"] for r in runs[4][0]]
    one, four = runs[1][1], runs[4][1]
    assert (one["batches"], four["batches"]) == (6, 2)
    assert one["response_tokens"] == four["response_tokens"] == sum(r["output_tokens"] for r in runs[4][0])
    # tokens per forward counts each sample's own forwards: the same whatever the batch size
    assert one["tokens_per_forward"] == pytest.approx(four["tokens_per_forward"]) and one["tokens_per_forward"] > 0.5
    assert four["forwards"] < one["forwards"] and four["tokens_per_second"] > 0
    assert [json.loads(line)["batch_size"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()] == [1, 4]
    # the batch really is padded and masked (mixed prompt lengths)
    batch = bard.encode([bard.messages_for(item) for item in _items(3)])
    assert not bool(batch["attention_mask"].all()) and bool(batch["attention_mask"][:, -1].all())


def test_model_args_win_and_stop_strings_cut(loaded, toy_model_dir):
    model, processor = loaded
    bard = BatchedBardVL(str(toy_model_dir), batch_size=2, model=model, processor=processor, system_prompt="",
                         max_new_tokens=8, denoising_steps=2)
    options, stops = bard.options_for({"max_new_tokens": 64, "temperature": 0, "until": ["\n\n", "blue"]})
    assert options == {"max_new_tokens": 8, "temperature": 0.0, "denoising_steps": 2} and stops == ["blue"]
    bard = BatchedBardVL(str(toy_model_dir), batch_size=2, model=model, processor=processor, system_prompt="")
    results = bard.generate(_items(1, max_new_tokens=48, until="blue"))
    assert results[0]["text"] == TOY_PAIRS[0][1].split("blue")[0].strip()
    with pytest.raises(TypeError, match="unknown Bard-VL model_args"):
        BatchedBardVL(str(toy_model_dir), model=model, processor=processor, blocksize=4)
    with pytest.raises(ValueError, match="unknown remasking_strategy"):
        BatchedBardVL(str(toy_model_dir), model=model, processor=processor, remasking_strategy="nope")


def test_process_placement_follows_the_launcher():
    """Each process of ``accelerate launch`` / ``torchrun`` gets its local rank's GPU and its rank (lmms-eval shards
    requests by rank); the CPU stays the CPU; a rank without a GPU is refused."""
    from nemo_automodel_bard.evaluation.batched import Placement, process_placement

    assert process_placement(None, {}, cuda_devices=0) == Placement("cpu", 0, 1, 0)
    assert process_placement("cuda", {}, cuda_devices=2) == Placement("cuda:0", 0, 1, 0)
    launched = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert process_placement("cuda", launched, cuda_devices=4) == Placement("cuda:1", 5, 8, 1)
    assert process_placement("cuda:0", launched, cuda_devices=4).device == "cuda:1"  # not everyone on one GPU
    assert process_placement("cpu", launched, cuda_devices=4) == Placement("cpu", 5, 8, 1)
    assert process_placement("cuda:1", {}, cuda_devices=2).device == "cuda:1"  # one process: as asked
    with pytest.raises(ValueError, match="local rank 3 has no GPU: 2 visible"):
        process_placement(None, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, cuda_devices=2)


def test_batch_size_auto_is_refused_clearly(loaded, toy_model_dir):
    from nemo_automodel_bard.evaluation.batched import parse_batch_size

    assert parse_batch_size("8") == 8 and parse_batch_size(2) == 2
    for value in ("auto", "auto:4"):
        with pytest.raises(ValueError, match="does not size batches automatically.*--batch_size N"):
            parse_batch_size(value)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        parse_batch_size(0)
    model, processor = loaded
    with pytest.raises(ValueError, match="automatically"):
        BatchedBardVL(str(toy_model_dir), model=model, processor=processor, batch_size="auto")


def test_longest_questions_first_and_images_capped(loaded, toy_model_dir):
    from PIL import Image

    from nemo_automodel_bard.evaluation.batched import DEFAULT_MAX_PIXELS

    model, processor = loaded
    bard = BatchedBardVL(str(toy_model_dir), batch_size=2, model=model, processor=processor, system_prompt="",
                         block_size=4, max_new_tokens=8)
    seen = []
    batch = bard._batch
    bard._batch = lambda items, *rest: seen.append([len(i.context) for i in items]) or batch(items, *rest)
    items = _items(5, max_new_tokens=8)
    results = bard.generate(items)
    lengths = [len(i.context) for i in items]
    assert sum(seen, []) == sorted(lengths, reverse=True)  # batches of similar lengths, longest first
    assert len(results) == 5 and all(r is not None for r in results)
    # images are capped at lmms-eval's Qwen3-VL bound by default (a 3 MP picture would pass uncapped)
    assert bard.image_kwargs == {"max_pixels": DEFAULT_MAX_PIXELS}
    item = EvalItem(context="Describe.", visuals=[Image.new("RGB", (2000, 1500), (200, 30, 30))])
    grid = bard.encode([bard.messages_for(item)])["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    assert 0 < int(grid.prod()) * patch * patch <= DEFAULT_MAX_PIXELS < 2000 * 1500


def test_entry_point_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"]["bard_vl"] == "nemo_automodel_bard.evaluation.lmms_eval_plugin:manifest"
    assert "lmms-eval" in " ".join(project["optional-dependencies"]["eval"])


def _lmms_python() -> str | None:
    """A Python that runs lmms-eval with this package's entry point: this one when lmms-eval is installed here,
    else the one ``BARD_LMMS_EVAL_PYTHON`` names (lmms-eval in its own environment, docs/evaluation.md)."""
    if importlib.util.find_spec("lmms_eval") is not None:
        return sys.executable
    python = os.environ.get("BARD_LMMS_EVAL_PYTHON")
    return python if python and Path(python).exists() else None


LMMS_MISSING = "lmms-eval is not installed here and BARD_LMMS_EVAL_PYTHON names no Python with it (docs/evaluation.md)"


def _needs_entry_point(python: str) -> None:
    probe = "import importlib.metadata as m; print(*[e.name for e in m.entry_points(group='lmms_eval.models')])"
    names = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120).stdout.split()
    if "bard_vl" not in names:
        pytest.skip(f"{python}'s install of the package predates the entry point (reinstall it)")


@pytest.mark.slow
@pytest.mark.skipif(_lmms_python() is None, reason=LMMS_MISSING)
def test_lmms_eval_runs_the_tiny_task_end_to_end(toy_model_dir, tmp_path):
    python = _lmms_python()
    _needs_entry_point(python)
    records = [{"question": p, "answer": a, "image": toy_picture(*pic) if pic else None} for p, a, pic in TOY_PAIRS]
    task_dir = write_tiny_task(tmp_path / "task", records * 2)
    stats = tmp_path / "stats.jsonl"
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    command = [python, "-m", "lmms_eval", "--model", "bard_vl",
               "--model_args", f"pretrained={toy_model_dir},block_size=4,system_prompt=,stats_path={stats}",
               "--tasks", "bard_tiny", "--include_path", str(task_dir), "--batch_size", "2", "--device", "cpu",
               "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*results*.json")]
    assert results, done.stdout[-2000:]
    assert results[0]["results"]["bard_tiny"]["exact_match,none"] == 1.0
    report = json.loads(stats.read_text().splitlines()[-1])
    assert report["samples"] == 6 and report["batches"] == 3 and report["tokens_per_forward"] > 0.5
    assert "tokens/forward" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(_lmms_python() is None, reason=LMMS_MISSING)
def test_two_lmms_eval_processes_give_the_scores_of_one(toy_model_dir, tmp_path):
    """``accelerate launch --num_processes 2`` on the CPU: both ranks answer a share of the tiny task's 7 questions
    (unequal shares), lmms-eval merges them once, and the scores and every answer equal a one-process run's
    (benchmarks/lmms_eval_two_process.py, which docs/evaluation.md runs)."""
    python = _lmms_python()
    _needs_entry_point(python)
    spec = importlib.util.spec_from_file_location("lmms_eval_two_process", ROOT / "benchmarks" / "lmms_eval_two_process.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.compare(python, toy_model_dir, tmp_path, copies=2, extra=1)
    one, two = summary["one_process"], summary["two_processes"]
    assert one["scores"]["exact_match,none"] == 1.0
    assert summary["same_scores"] and summary["same_answers"], summary
    assert one["samples_per_rank"] == [7] and sorted(two["samples_per_rank"]) == [4, 4]  # lmms-eval pads a share


def test_one_path_from_a_chat_to_model_inputs(loaded, toy_model_dir, tmp_path):
    """The server (OpenAI parts: inline images, a video below the media root), ``infer`` and the evaluation encode
    the same chat with two images and a video into identical model inputs: one function does it for all."""
    import base64
    import io

    import torch

    from nemo_automodel_bard.demo import write_demo_video
    from nemo_automodel_bard.serving.prompt import encode_messages
    from nemo_automodel_bard.serving.server import BardServer, ServeConfig

    model, processor = loaded
    images = [toy_picture(64, 64, (200, 30, 30)), toy_picture(128, 96, (30, 200, 30))]
    video = write_demo_video(tmp_path / "clip.mp4")
    question = "What differs?"
    # infer: its chat goes straight to encode_messages
    reference = encode_messages(processor, [{"role": "user", "content": [
        *({"type": "image", "image": image} for image in images), {"type": "video", "video": str(video)},
        {"type": "text", "text": question}]}])

    def data_url(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    server = BardServer(model, processor, ServeConfig(model_name="m", media_root=tmp_path))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": data_url(image)}} for image in images),
            {"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": question}]}]}
        served = server.prepare(body).inputs
    finally:
        server.close()
    bard = BatchedBardVL(str(toy_model_dir), model=model, processor=processor, system_prompt="", max_num_frames=768)
    evaluated = bard.encode([bard.messages_for(EvalItem(context=question, visuals=[*images, str(video)]))])
    for inputs in (served, evaluated):
        assert sorted(inputs) == sorted(reference)
        for key, value in reference.items():
            assert torch.equal(inputs[key], value), key
    assert reference["pixel_values_videos"].numel() and reference["image_grid_thw"].shape[0] == 2


def test_plugin_under_a_two_process_launch_without_lmms_eval(loaded, toy_model_dir, monkeypatch):
    """The plugin's glue with stand-ins for lmms-eval's base class and accelerate (neither can be installed here):
    rank 1 of 2 reports its rank and world size (lmms-eval shards requests by them), hands lmms-eval the
    Accelerator, keeps --device cpu, refuses --batch_size auto, and answers with token counts."""
    import dataclasses
    import importlib
    import types

    class Lmms:
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.cache_hook = types.SimpleNamespace(add_partial=lambda *args: None)

    @dataclasses.dataclass
    class TokenCounts:
        input_tokens: int
        output_tokens: int

    @dataclasses.dataclass
    class GenerationResult:
        text: str
        token_counts: TokenCounts

    class Accelerator:
        process_index, num_processes, local_process_index = 1, 2, 1

    stubs = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
             "lmms_eval.api.instance": types.ModuleType("lmms_eval.api.instance"),
             "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"), "accelerate": types.ModuleType("accelerate")}
    stubs["lmms_eval.api.instance"].Instance = types.SimpleNamespace
    stubs["lmms_eval.api.instance"].GenerationResult = GenerationResult
    stubs["lmms_eval.api.instance"].TokenCounts = TokenCounts
    stubs["lmms_eval.api.model"].lmms = Lmms
    stubs["accelerate"].Accelerator = Accelerator
    if importlib.util.find_spec("loguru") is None:  # an lmms-eval dependency
        stubs["loguru"] = types.ModuleType("loguru")
        stubs["loguru"].logger = types.SimpleNamespace(info=lambda *args: None)
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    import nemo_automodel_bard.evaluation as evaluation

    name = "nemo_automodel_bard.evaluation.lmms_eval_plugin"  # imported against the stand-ins, forgotten afterwards
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    del sys.modules[name]
    monkeypatch.setattr(evaluation, "lmms_eval_plugin", None, raising=False)
    plugin = importlib.import_module(name)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    model, processor = loaded
    monkeypatch.setattr("nemo_automodel_bard.serving.prompt.load_for_inference", lambda *args: (model, processor))
    with pytest.raises(ValueError, match="automatically"):
        plugin.BardVL(str(toy_model_dir), device="cpu", batch_size="auto")
    bard = plugin.BardVL(str(toy_model_dir), device="cpu", batch_size="2", block_size=4, system_prompt="")
    assert (bard.rank, bard.world_size, bard.device, bard.batch_size) == (1, 2, "cpu", 2)
    assert isinstance(bard.accelerator, Accelerator)
    docs = {k: {"picture": toy_picture(*pic) if pic else None} for k, (_, _, pic) in enumerate(TOY_PAIRS)}
    bard.task_dict = {"toy": {"test": docs}}
    requests = [types.SimpleNamespace(args=(prompt, {"max_new_tokens": 48, "until": ["\n\n"]},
                                            lambda doc: [doc["picture"]], k, "toy", "test"))
                for k, (prompt, _, _) in enumerate(TOY_PAIRS)]
    results = bard.generate_until(requests)
    assert [r.text for r in results] == [answer for _, answer, _ in TOY_PAIRS]
    assert all(r.token_counts.output_tokens > 0 for r in results)

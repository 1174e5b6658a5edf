"""Energon shards: JSONL -> shards -> the same collated batches, disjoint shards per rank (two gloo
processes), an exact resume from the saved loader state (reader and recipe), and a weighted blend."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.energon")

from helpers import read_jsonl, read_weights  # noqa: E402

from nemo_automodel_bard.data.chat_dataset import ChatDataset  # noqa: E402
from nemo_automodel_bard.data.energon import (  # noqa: E402
    EnergonChatStream,
    EnergonDataError,
    convert_to_energon,
    decode_state,
    encode_state,
    main,
)
from nemo_automodel_bard.data.shapes import ShapesTask, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PBM_B2 = ROOT / "recipes" / "tiny" / "pbm.yaml"


def _take(stream: EnergonChatStream, n: int, it=None) -> list[dict]:
    it = iter(stream) if it is None else it
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """12 shapes records as JSONL (+ PNGs) and as Energon shards of 3 samples each."""
    root = tmp_path_factory.mktemp("energon")
    jsonl = write_jsonl(ShapesTask(seed=0), "train", 12, root / "jsonl")
    summary = convert_to_energon(jsonl, root / "shards", samples_per_shard=3)
    assert summary["samples"] == 12 and summary["shards"] == 4 and summary["skipped"] == []
    return jsonl, root / "shards"


def test_round_trip_jsonl_to_shards_gives_the_same_batches(shards, tiny_processor):
    from nemo_automodel_bard.recipes.collate import NemoDiffusionCollate

    jsonl, path = shards
    reference = ChatDataset(jsonl)
    stream = EnergonChatStream(path)
    records = _take(stream, 24)
    records, second = records[:12], records[12:]
    assert sorted(r["index"] for r in records) == list(range(12))  # one pass: every sample once
    assert {r["noise_epoch"] for r in records} == {0} and {r["noise_epoch"] for r in second} == {1}
    first = records[0]["messages"][0]["content"][0]["image"]
    assert isinstance(first, bytes)  # self-contained: the PNG's bytes travel in the shard
    collate = NemoDiffusionCollate(processor=tiny_processor, block_size=4, seed=3)
    for start in range(0, 12, 4):
        chunk = records[start:start + 4]
        from_shards = collate(chunk)
        from_jsonl = collate([reference[r["index"]] for r in chunk])
        assert from_shards.keys() == from_jsonl.keys()
        for key, value in from_jsonl.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, from_shards[key]), key
            else:
                assert value == from_shards[key], key
    # the second pass is the collator's epoch 1: other noise, the same as the JSONL records at epoch 1
    again = collate(second[:4])
    collate.set_epoch(1)
    assert torch.equal(again["input_ids"], collate([reference[r["index"]] for r in second[:4]])["input_ids"])
    collate.set_epoch(0)
    assert not torch.equal(again["input_ids"], collate([reference[r["index"]] for r in second[:4]])["input_ids"])


def test_frame_videos_and_broken_records(tmp_path, tiny_processor):
    from PIL import Image

    from nemo_automodel_bard.recipes.collate import NemoDiffusionCollate

    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(2)]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"f{i}.png")
    good = {"messages": [{"role": "user", "content": [{"type": "video", "video": ["f0.png", "f1.png"]},
                                                      {"type": "text", "text": "what moves?"}]},
                         {"role": "assistant", "content": "a red square"}]}
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                            {"role": "assistant", "content": "x"}]}
    lines = [json.dumps(good), "{not json", json.dumps(missing), json.dumps(good)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    summary = convert_to_energon(tmp_path / "data.jsonl", tmp_path / "shards")
    assert summary["samples"] == 2
    assert [i for i, _ in summary["skipped"]] == [1, 2]
    assert "line 2: invalid JSON" in summary["skipped"][0][1] and "nope.png" in summary["skipped"][1][1]
    records = _take(EnergonChatStream(tmp_path / "shards"), 2)
    assert sorted(r["index"] for r in records) == [0, 3]
    collate = NemoDiffusionCollate(processor=tiny_processor, block_size=4)
    reference = ChatDataset(tmp_path / "data.jsonl")
    a, b = collate(sorted(records, key=lambda r: r["index"])), collate([reference[0], reference[3]])
    assert torch.equal(a["pixel_values_videos"], b["pixel_values_videos"]) and torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="record 1: .*invalid JSON"):
        convert_to_energon(tmp_path / "data.jsonl", tmp_path / "strict", strict=True)
    with pytest.raises(EnergonDataError, match="not a prepared Energon dataset"):
        EnergonChatStream(tmp_path)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_from_the_saved_state_continues_exactly(shards, tmp_path, workers):
    _, path = shards
    kwargs = dict(num_workers=workers, shuffle_buffer_size=4, max_samples_per_sequence=2)
    stream = EnergonChatStream(path, **kwargs)
    it = iter(stream)
    head = [r["index"] for r in _take(stream, 7, it)]
    torch.save(stream.state_dict(), tmp_path / "state.pt")  # what a checkpoint holds; the run is then killed
    reference = head + [r["index"] for r in _take(stream, 23, it)]  # ... or it goes on without interruption
    resumed = EnergonChatStream(path, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))  # plain types, no pickle
    tail = [r["index"] for r in _take(resumed, 23)]
    assert head + tail == reference
    assert set(reference) == set(range(12)) and len(set(head)) == 7
    fresh = [r["index"] for r in _take(EnergonChatStream(path, **kwargs), 7)] if workers == 0 else head
    assert fresh == head  # the order is reproducible from the seed
    del it, stream, resumed
    import gc

    gc.collect()  # worker processes stop here (torch's worker join takes ~5 s), not in a later test


def test_state_codec_round_trip_and_refuses_foreign_classes():
    from megatron.energon.savable_loader import SavableDataLoaderState
    from megatron.energon.state import FlexState

    state = SavableDataLoaderState(worker_states=[FlexState(a=b"\x00\x01", t=(1, 2.5, None), x=torch.arange(3))],
                                   next_worker_id=0, micro_batch_size=None)
    back = decode_state(encode_state(state))
    assert isinstance(back, SavableDataLoaderState) and isinstance(back.worker_states[0], FlexState)
    assert back.worker_states[0]["a"] == b"\x00\x01" and back.worker_states[0]["t"] == (1, 2.5, None)
    assert torch.equal(back.worker_states[0]["x"], torch.arange(3))
    bad = json.dumps({"__class__": "os:system", "fields": {}})
    with pytest.raises(EnergonDataError, match="outside megatron.energon"):
        decode_state(bad)


def test_blend_proportions_follow_the_weights(tmp_path):
    for name, color in (("a", 0), ("b", 1)):
        records = [{"index": i, "messages": [{"role": "user", "content": f"{name}{i}"},
                                             {"role": "assistant", "content": "ok"}]} for i in range(20)]
        convert_to_energon(records, tmp_path / name, samples_per_shard=5)
    (tmp_path / "blend.yaml").write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
        "      - weight: 3\n        path: a\n        subflavors: {source: a}\n"
        "      - weight: 1\n        path: b\n        subflavors: {source: b}\n")
    records = _take(EnergonChatStream(tmp_path / "blend.yaml"), 1000)
    share = sum(r["source"] == "a" for r in records) / len(records)
    print(f"blend 3:1 -> share of source a over {len(records)} samples: {share:.3f}")
    assert abs(share - 0.75) < 0.04, share  # 3 binomial standard deviations (0.014)
    assert {r["messages"][0]["content"][0] for r in records} == {"a", "b"}


def _read_rank(rank: int, world: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from nemo_automodel_bard.data.energon import energon_dataset

        stream = energon_dataset(path)  # rank and world size from torch.distributed
        n = stream.num_samples()
        indices = [r["index"] for r in _take(stream, n)]
        Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": stream.rank, "indices": indices}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_read_disjoint_shards(shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["TEST_PORT"] = str(s.getsockname()[1])
    _, path = shards
    mp.start_processes(_read_rank, args=(2, str(path), str(tmp_path)), nprocs=2, start_method="fork")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["rank"] for g in got] == [0, 1]
    a, b = set(got[0]["indices"]), set(got[1]["indices"])
    assert len(got[0]["indices"]) == len(a) and len(got[1]["indices"]) == len(b)  # one pass, no repeats
    assert a and b and not a & b and a | b == set(range(12))


def test_converter_command(tmp_path, capsys):
    jsonl = write_jsonl(ShapesTask(seed=1), "train", 4, tmp_path / "j")
    assert main([str(jsonl), str(tmp_path / "out"), "--samples-per-shard", "2", "--workers", "1",
                 "--split", "train:0.5,val:0.5"]) == 0
    assert "wrote 4 samples in 2 shards" in capsys.readouterr().out
    train = [r["index"] for r in _take(EnergonChatStream(tmp_path / "out"), 2)]
    val = EnergonChatStream(tmp_path / "out", split="val")
    first, again = [r["index"] for r in val], [r["index"] for r in val]  # validation: one ordered pass each time
    assert first == again and len(first) == 2 and sorted(train + first) == [0, 1, 2, 3]


@pytest.mark.slow
def test_recipe_trains_from_shards_and_resumes_exactly(shards, tiny_model_dir, tmp_path):
    from nemo_automodel_bard.recipes.common import run_recipe

    _, path = shards
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=4",
              "--step_scheduler.global_batch_size=4", "--step_scheduler.local_batch_size=2",
              "--step_scheduler.ckpt_every_steps=100", "--validation_dataset=None", "--bard.progress_bar=false",
              "--dataset._target_=nemo_automodel_bard.data.energon.energon_dataset", f"--dataset.path={path}",
              "--dataset.shuffle_buffer_size=4"]
    run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'a'}"])
    stopped = run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}", "--bard.stop_after_steps=2"])
    assert stopped.step_scheduler.step == 2
    state = torch.load(tmp_path / "b" / "epoch_0_step_1" / "dataloader" / "dataloader_dp_rank_0.pt", weights_only=True)
    assert state["dataset_state"]["yielded"] == 8  # 2 steps x 4 samples, nothing prefetched
    run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'b'}"])
    log_a, log_b = read_jsonl(tmp_path / "a" / "training.jsonl"), read_jsonl(tmp_path / "b" / "training.jsonl")
    assert [r["step"] for r in log_b] == [0, 1, 2, 3]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert [r["num_samples"] for r in log_a] == [4, 4, 4, 4]
    a, b = read_weights(tmp_path / "a" / "final"), read_weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_recipe_by_epochs_stops_after_the_data_passes(shards, tiny_model_dir, tmp_path):
    from nemo_automodel_bard.recipes.common import RecipeConfigError, run_recipe

    _, path = shards
    common = [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=None",
              "--step_scheduler.num_epochs=2", "--step_scheduler.global_batch_size=8",
              "--step_scheduler.local_batch_size=8", "--validation_dataset=None", "--bard.progress_bar=false",
              "--dataset._target_=nemo_automodel_bard.data.energon.energon_dataset", f"--dataset.path={path}"]
    run_recipe(PBM_B2, [*common, f"--checkpoint.checkpoint_dir={tmp_path / 'a'}"])
    log = read_jsonl(tmp_path / "a" / "training.jsonl")
    assert len(log) == 3  # 2 epochs x 12 samples / 8 per step
    with pytest.raises(RecipeConfigError, match="set dataset.num_workers instead"):
        run_recipe(PBM_B2, [*common, "--dataloader.num_workers=2", f"--checkpoint.checkpoint_dir={tmp_path / 'b'}"])


def test_recipe_loader_reads_the_shards_of_its_data_parallel_rank(shards, tiny_model_dir):
    from nemo_automodel.recipes._typed_config import RecipeConfig

    from nemo_automodel_bard.recipes.common import load_recipe_config
    from nemo_automodel_bard.recipes.energon_loader import install_stream_dataloaders

    _, path = shards
    cfg = RecipeConfig(load_recipe_config(PBM_B2, [
        f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--validation_dataset=None",
        "--dataset._target_=nemo_automodel_bard.data.energon.energon_dataset", f"--dataset.path={path}"]))
    assert install_stream_dataloaders(cfg)
    seen = []
    for rank in (0, 1):
        build = cfg.vlm_dataloader.build(pretrained_model_name_or_path=str(tiny_model_dir), dp_rank=rank,
                                         dp_world_size=2, batch_size=3)
        loader = build.dataloader
        assert loader.dataset.rank == rank and loader.dataset.world_size == 2
        batches = [batch for _, batch in zip(range(2), loader)]  # 2 x 3 = this rank's 6 samples
        assert all(b["input_ids"].shape[0] == 3 for b in batches)
        seen.append({int(i) for b in batches for i in b["sample_indices"].tolist()})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))

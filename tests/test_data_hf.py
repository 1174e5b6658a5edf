"""Hugging Face datasets in the chat schema: the same batches as the JSONL reader, per-row errors counted,
a local data-file directory and a saved dataset, and a recipe that trains from one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")

from helpers import read_jsonl  # noqa: E402

from nemo_automodel_bard.data.chat_dataset import ChatDataset  # noqa: E402
from nemo_automodel_bard.data.factory import make_dataset  # noqa: E402
from nemo_automodel_bard.data.shapes import ShapesTask, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PBM_B2 = ROOT / "recipes" / "tiny" / "pbm.yaml"
FEATURES = None


def _features():
    item = {"type": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Image()}
    return datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                         "content": datasets.List(item)})})


def _rows(jsonl: Path) -> list[dict]:
    """The JSONL records as Arrow-friendly rows: every content a list, images as ``datasets.Image`` values."""
    rows = []
    for record in read_jsonl(jsonl):
        messages = []
        for msg in record["messages"]:
            content = msg["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            items = []
            for item in content:
                image = item.get("image")
                items.append({"type": item["type"], "text": item.get("text"),
                              "image": str(jsonl.parent / image) if image else None})
            messages.append({"role": msg["role"], "content": items})
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    jsonl = write_jsonl(ShapesTask(seed=0), "train", 8, root / "jsonl")
    ds = datasets.Dataset.from_list(_rows(jsonl), features=_features())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "saved"))
    (root / "files").mkdir()
    ds.to_parquet(str(root / "files" / "train.parquet"))
    return jsonl, root


@pytest.mark.parametrize("layout", ["saved", "files"])
def test_hf_dataset_gives_the_jsonl_batches(hf_data, tiny_processor, layout):
    from nemo_automodel_bard.recipes.collate import NemoDiffusionCollate

    jsonl, root = hf_data
    hf = make_dataset(kind="hf", name=str(root / layout), split="train")
    reference = ChatDataset(jsonl)
    assert len(hf) == len(reference) == 8 and hf[3]["index"] == 3
    collate = NemoDiffusionCollate(processor=tiny_processor, block_size=4, seed=5)
    a, b = collate([hf[i] for i in range(8)]), collate([reference[i] for i in range(8)])
    for key, value in b.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, a[key]), key


def test_broken_rows_are_counted_and_named(tmp_path, hf_data):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "image": None}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yo", "image": None}]}]},
            {"messages": [{"role": "robot", "content": [{"type": "text", "text": "x", "image": None}]}]},
            {"messages": []}]
    datasets.Dataset.from_list(rows, features=_features()).save_to_disk(str(tmp_path / "d"))
    ds = make_dataset(kind="hf", name=str(tmp_path / "d"), split="train")
    assert ds[0]["messages"][1]["content"][0]["text"] == "yo"
    assert ds[1] == {"messages": None, "index": 1, "error": ds[1]["error"]} and "row 1: message 0 has role 'robot'" in ds[1]["error"]
    assert "row 2: missing or empty 'messages'" in ds[2]["error"]
    assert ds.num_invalid == 2
    with pytest.raises(ValueError, match="record 1: row 1"):
        make_dataset(kind="hf", name=str(tmp_path / "d"), split="train", strict=True)[1]
    with pytest.raises(ValueError, match="split 'test' not found; available: \\['train'\\]"):
        make_dataset(kind="hf", name=str(hf_data[1] / "saved"), split="test")
    with pytest.raises(ValueError, match="cannot load"):
        make_dataset(kind="hf", name=str(tmp_path / "nowhere"), split="train")


@pytest.mark.slow
def test_recipe_trains_from_a_hf_dataset(hf_data, tiny_model_dir, tmp_path):
    from nemo_automodel_bard.recipes.common import run_recipe

    _, root = hf_data
    run_recipe(PBM_B2, [f"--model.pretrained_model_name_or_path={tiny_model_dir}", "--step_scheduler.max_steps=2",
                        "--step_scheduler.global_batch_size=4", "--step_scheduler.local_batch_size=4",
                        "--step_scheduler.ckpt_every_steps=100", "--validation_dataset=None",
                        "--bard.progress_bar=false", "--dataset._target_=nemo_automodel_bard.data.factory.make_dataset",
                        "--dataset.kind=hf", f"--dataset.name={root / 'files'}", "--dataset.split=train",
                        f"--checkpoint.checkpoint_dir={tmp_path / 'out'}"])
    log = read_jsonl(tmp_path / "out" / "training.jsonl")
    assert [r["num_samples"] for r in log] == [4, 4] and (tmp_path / "out" / "final").exists()


def test_missing_extras_name_the_extra_to_install(monkeypatch):
    import sys

    from nemo_automodel_bard.data import energon, hf_dataset

    monkeypatch.setitem(sys.modules, "megatron.energon", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[data\]'"):
        energon.energon_dataset("/anywhere")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[data\]'"):
        hf_dataset.HFChatDataset("/anywhere")


def test_loading_never_downloads(monkeypatch):
    import datasets.config

    seen = []
    real, before = datasets.load_dataset, datasets.config.HF_HUB_OFFLINE

    def spy(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    with pytest.raises(ValueError, match="cannot load 'no-such-org/no-such-dataset'"):
        make_dataset(kind="hf", name="no-such-org/no-such-dataset", split="train")
    assert seen == [True]  # offline while loading: a name not in the cache fails at once, nothing is fetched
    assert datasets.config.HF_HUB_OFFLINE == before  # and the setting is restored

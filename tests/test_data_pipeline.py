"""The pipeline's data=energon and data=hf: recipe overrides, config errors before any work, and a short
tiny pipeline that trains from Energon shards and from a Hugging Face dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("megatron.energon")
datasets = pytest.importorskip("datasets")

from helpers import read_jsonl, record_training  # noqa: E402, F401

from nemo_automodel_bard.data.energon import convert_to_energon  # noqa: E402
from nemo_automodel_bard.data.shapes import ShapesTask, write_jsonl  # noqa: E402
from nemo_automodel_bard.pipeline import stages  # noqa: E402
from nemo_automodel_bard.pipeline.app import REPO_ROOT, config_dir, run_pipeline  # noqa: E402
from nemo_automodel_bard.pipeline.manifest import Manifest  # noqa: E402
from nemo_automodel_bard.pipeline.validate import PipelineConfigError  # noqa: E402

SHORT = ["stages=[ar_pretrain,ar_init,pbm]", "ar_pretrain.max_steps=2", "pbm.block_sizes=[2]", "pbm.max_steps=2",
         "pbm.first_stage_steps=2", "pbm.complementary=false", "threads=1",
         "model.init=null"]  # the tiny AR model trained here


def _compose(overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """16 shapes records as JSONL, as Energon shards and as a saved Hugging Face dataset (+ 4 held-out)."""
    root = tmp_path_factory.mktemp("sources")
    task = ShapesTask(seed=0)
    train = write_jsonl(task, "train", 16, root / "jsonl")
    heldout = write_jsonl(task, "heldout", 4, root / "jsonl")
    convert_to_energon(train, root / "shards", samples_per_shard=4)
    from nemo_automodel_bard.data.chat_dataset import ChatDataset

    def as_rows(path):
        ds = ChatDataset(path)
        out = []
        for i in range(len(ds)):
            msgs = ds[i]["messages"]
            out.append({"messages": [{"role": m["role"], "content": (
                [{"type": "text", "text": m["content"], "image": None}] if isinstance(m["content"], str) else
                [{"type": c["type"], "text": c.get("text"), "image": c.get("image")} for c in m["content"]])}
                for m in msgs]})
        return out

    item = {"type": datasets.Value("string"), "text": datasets.Value("string"), "image": datasets.Image()}
    features = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                             "content": datasets.List(item)})})
    datasets.DatasetDict({"train": datasets.Dataset.from_list(as_rows(train), features=features),
                          "test": datasets.Dataset.from_list(as_rows(heldout), features=features)}
                         ).save_to_disk(str(root / "hf"))
    return {"jsonl": train, "heldout": heldout, "shards": root / "shards", "hf": root / "hf"}


def test_energon_and_hf_reach_every_training_stage(sources, tmp_path, monkeypatch):
    for data in (["data=energon", f"data.path={sources['shards']}", f"data.eval_path={sources['heldout']}"],
                 ["data=hf", f"data.name={sources['hf']}", "data.split=train", "data.eval_split=test",
                  "run_name=tiny-hf"]):
        runs = record_training(monkeypatch)
        work = tmp_path / data[0].split("=")[1]
        cfg = OmegaConf.to_container(_compose([f"work_dir={work}", "pbm.block_sizes=[2,4]", *data]), resolve=True)
        cfg.pop("hydra", None)
        ctx = stages.Context(cfg=cfg, work_dir=tmp_path, output_dir=tmp_path, repo_root=REPO_ROOT,
                             manifest=Manifest(work))
        ctx.outputs["ar_init"] = {"model_dir": str(tmp_path / "init")}
        stages.stage_pbm(ctx)
        assert [r["_recipe"] for r in runs] == ["pbm.yaml", "pbm.yaml"]
        if data[0] == "data=energon":
            for r in runs:
                assert r["dataset._target_"] == "nemo_automodel_bard.data.energon.energon_dataset"
                assert r["dataset.path"] == str(sources["shards"]) and r["dataloader.num_workers"] == 0
                assert r["validation_dataset.path"] == str(sources["heldout"])
            assert runs[0]["dataset.seed_offset"] != runs[1]["dataset.seed_offset"]  # each stage its own order
        else:
            for r in runs:
                assert (r["dataset.kind"], r["dataset.name"], r["dataset.split"]) == ("hf", str(sources["hf"]), "train")
                assert (r["validation_dataset.kind"], r["validation_dataset.split"]) == ("hf", "test")


@pytest.mark.parametrize("overrides, message", [
    (["data=energon"], "data.path is required with data=energon"),
    (["data=energon", "data.path=/no/such/shards"], "neither a prepared dataset directory nor a metadataset"),
    (["data=hf", "run_name=x"], "data.name is required with data=hf"),
    (["data=hf", "data.name=/no/such/dataset", "run_name=x"], "cannot load"),
])
def test_data_config_errors_before_any_work(tmp_path, overrides, message):
    with pytest.raises(PipelineConfigError, match=message):
        run_pipeline(_compose([f"work_dir={tmp_path}", *overrides]))
    assert not (tmp_path / "manifest.json").exists()


def test_energon_refuses_self_distill_and_hf_checks_its_eval_split(sources, tmp_path):
    with pytest.raises(PipelineConfigError, match="self_distill decodes its training prompts one by one"):
        run_pipeline(_compose([f"work_dir={tmp_path}", "data=energon", f"data.path={sources['shards']}",
                               "stages=[ar_pretrain,ar_init,pbm,self_distill]"]))
    with pytest.raises(PipelineConfigError, match="split 'val' not found"):
        run_pipeline(_compose([f"work_dir={tmp_path}", "data=hf", f"data.name={sources['hf']}", "run_name=x",
                               "data.eval_split=val", "stages=[ar_pretrain]"]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["energon", "hf"])
def test_tiny_pipeline_trains_from_the_source(sources, tmp_path, kind):
    data = (["data=energon", f"data.path={sources['shards']}", "data.num_workers=0"] if kind == "energon" else
            ["data=hf", f"data.name={sources['hf']}", "data.split=train", "run_name=tiny-hf"])
    outputs = run_pipeline(_compose([f"work_dir={tmp_path}", *SHORT, *data]), tmp_path)
    log = read_jsonl(Path(outputs["pbm"]["b2_log"]) / "training.jsonl")
    # the tiny PBM batch is 16 (pbm.overrides): the Energon stream repeats without end (16 per step); the 16-record
    # Hugging Face dataset gives one batch of 16 per epoch
    assert [r["step"] for r in log] == [0, 1]
    assert [r["num_samples"] for r in log] == [16, 16]
    assert (Path(outputs["pbm"]["b2_dir"]) / "config.json").exists()

"""LoRA / PEFT (docs/peft.md): the ``peft`` config group, a LoRA PBM run (only adapters train, checkpoints resume
them, the run exports a merged Bard-VL directory and a ``peft`` adapter directory), the adapter directory loaded
with transformers + peft in a fresh interpreter decoding token-identically to the merged export, and the tiny
pipeline with ``peft=lora``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import QUICK_RECIPE, read_weights

from nemo_automodel_bard.recipes.peft_export import PeftExportError, lora_pairs, merge_lora_into_base

ROOT = Path(__file__).resolve().parents[1]
PBM = ROOT / "recipes" / "tiny" / "pbm.yaml"
TEXT_TARGETS = "['*.language_model.layers.*.self_attn.*_proj', '*.language_model.layers.*.mlp.*_proj']"
LORA = ["--peft._target_=nemo_automodel.components._peft.lora.PeftConfig", f"--peft.target_modules={TEXT_TARGETS}",
        "--peft.dim=8", "--peft.alpha=16"]


def _pipeline_config(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_automodel_bard.pipeline.app import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


def test_peft_group_gives_the_recipe_section_for_student_stages_only():
    from nemo_automodel_bard.pipeline.stages import peft_overrides

    assert peft_overrides(_pipeline_config([]), "pbm") == {}  # default: full fine-tuning, fingerprints unchanged
    cfg = _pipeline_config(["peft=lora"])
    section = peft_overrides(cfg, "pbm")
    assert section["peft._target_"] == "nemo_automodel.components._peft.lora.PeftConfig"
    assert (section["peft.dim"], section["peft.alpha"], section["peft.dropout"]) == (16, 32, 0.0)
    assert all("language_model" in t for t in section["peft.target_modules"])
    assert peft_overrides(cfg, "swd") == section == peft_overrides(cfg, "self_distill")
    assert peft_overrides(cfg, None) == {}  # the teacher and the SWD anchor train in full
    vision = peft_overrides(_pipeline_config(["peft=lora", "peft.vision=true"]), "pbm")["peft.target_modules"]
    assert any(".visual.blocks." in t for t in vision) and any("merger" in t for t in vision)
    assert peft_overrides(_pipeline_config(["peft=lora", "peft.stages=[swd]"]), "pbm") == {}


def test_lr_scale_multiplies_the_learning_rate_of_adapted_stages_only():
    from nemo_automodel_bard.pipeline.stages import peft_lr_scale

    assert peft_lr_scale(_pipeline_config([]), "pbm") == 1.0  # full fine-tuning: the recipe's lr
    cfg = _pipeline_config(["peft=lora", "peft.lr_scale=4", "peft.stages=[pbm]"])
    assert peft_lr_scale(cfg, "pbm") == 4.0
    assert peft_lr_scale(cfg, "swd") == peft_lr_scale(cfg, None) == 1.0  # trained in full: unscaled


@pytest.mark.parametrize("overrides, message", [
    (["peft=lora", "peft.lr_scale=0"], "peft.lr_scale"),
    (["peft=lora", "peft.stages=[teacher]"], "peft.stages"),
    (["peft=lora", "peft.dim=0"], "peft.dim"),
    (["peft=lora", "peft.target_modules=[]"], "peft.target_modules"),
    (["peft.name=qlora"], "peft.name"),
])
def test_bad_peft_settings_fail_before_any_work(tmp_path, overrides, message):
    from nemo_automodel_bard.pipeline.validate import PipelineConfigError, validate_config

    cfg = _pipeline_config([f"work_dir={tmp_path}", *overrides])
    with pytest.raises(PipelineConfigError, match=message):
        validate_config(cfg, ROOT, set())


def test_override_lists_of_patterns_reach_nemo_as_lists():
    from nemo_automodel.components.config.loader import translate_value

    from nemo_automodel_bard.pipeline.launch import format_overrides

    [arg] = format_overrides({"peft.target_modules": ["*.q_proj", "*.mlp.*_proj"]})
    assert translate_value(arg.split("=", 1)[1]) == ["*.q_proj", "*.mlp.*_proj"]


def test_merge_folds_scaled_low_rank_products_into_the_base(tmp_path):
    g = torch.Generator().manual_seed(0)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    weights = {"model.a.q_proj.weight": torch.randn(6, 4, generator=g), "model.b.norm.weight": torch.ones(4)}
    save_file(weights, str(base / "model.safetensors"))
    a, b = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    save_file({"base_model.model.model.a.q_proj.lora_A.weight": a, "base_model.model.model.a.q_proj.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8}))
    assert merge_lora_into_base(base, adapter, tmp_path / "merged") == ["model.a.q_proj.weight"]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(merged["model.a.q_proj.weight"], weights["model.a.q_proj.weight"] + 4.0 * b @ a)
    assert torch.equal(merged["model.b.norm.weight"], weights["model.b.norm.weight"])
    with pytest.raises(PeftExportError, match="only"):
        lora_pairs({"base_model.model.x.lora_A.weight": a})
    save_file({"base_model.model.model.c.lora_A.weight": a, "base_model.model.model.c.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(PeftExportError, match="does not have"):
        merge_lora_into_base(base, adapter, tmp_path / "merged2")


def _lora_run(model_dir, out: Path, *extra: str):
    from nemo_automodel_bard.recipes.common import run_recipe

    return run_recipe(PBM, [f"--model.pretrained_model_name_or_path={model_dir}", "--step_scheduler.max_steps=3",
                            *QUICK_RECIPE, "--optimizer.lr=1e-2", *LORA, f"--checkpoint.checkpoint_dir={out}", *extra])


@pytest.mark.slow
def test_lora_pbm_run_trains_adapters_only_resumes_them_and_exports_both_forms(tiny_model_dir, tmp_path):
    recipe = _lora_run(tiny_model_dir, tmp_path / "a")
    trainable = [n for n, p in recipe._unwrapped_model().named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".self_attn.q_proj." in n for n in trainable) and any(".mlp.down_proj." in n for n in trainable)
    assert not any(".visual." in n for n in trainable)

    export = json.loads((tmp_path / "a" / "export.json").read_text())
    final, adapter = tmp_path / "a" / "final", tmp_path / "a" / "adapter"
    assert Path(export["model_dir"]) == final.resolve() and Path(export["adapter_dir"]) == adapter.resolve()
    assert json.loads((final / "config.json").read_text())["block_size"] == 2  # the stage's config, not the base's
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 8, 16, None)
    assert Path(config["base_model_name_or_path"]) == Path(tiny_model_dir).resolve()
    base, merged = read_weights(Path(tiny_model_dir)), read_weights(final)
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    adapted = set(lora_pairs(load_file(str(adapter / "adapter_model.safetensors"))))
    assert changed == adapted  # embeddings (the MASK row), norms and the vision tower are the base's

    # an interrupted LoRA run resumes its adapters (and optimizer state) from NeMo's adapter checkpoint
    stopped = _lora_run(tiny_model_dir, tmp_path / "b", "--bard.stop_after_steps=2")
    assert stopped.step_scheduler.step == 2 and not (tmp_path / "b" / "adapter").exists()
    _lora_run(tiny_model_dir, tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a fresh interpreter with transformers + peft: the adapter on its base decodes as the merged export does
    script = textwrap.dedent(f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        adapter, merged_dir = {str(adapter)!r}, {str(final)!r}
        base_dir = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
        config = AutoConfig.from_pretrained(adapter)  # the stage's config (block size) over the base weights
        base = AutoModelForImageTextToText.from_pretrained(base_dir, config=config, dtype=torch.float32).eval()
        plain = {{k: v.clone() for k, v in base.state_dict().items()}}
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        model = peft_model.get_base_model()  # the Bard-VL module, its Linear layers now carrying the adapters
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(adapter)
        questions = ["what colour", "how many shapes", "where is the circle"]
        texts = [f"<|im_start|>user\\n{{q}}<|im_end|>\\n<|im_start|>assistant\\n" for q in questions]
        same, logit_gap, adapter_effect = [], 0.0, 0.0
        for text in texts:
            inputs = processor(text=[text], return_tensors="pt")
            with torch.no_grad():
                a = model(**inputs).logits
                m = merged(**inputs).logits
            logit_gap = max(logit_gap, (a - m).abs().max().item())
            ids_a = model.generate(inputs, max_new_tokens=16)
            ids_m = merged.generate(inputs, max_new_tokens=16)
            same.append(torch.equal(ids_a, ids_m))
        with torch.no_grad():
            unmerged = peft_model.unload()  # the base weights again: does the adapter change the output?
            adapter_effect = (unmerged(**inputs).logits - m).abs().max().item()
        print(json.dumps({{"same": same, "logit_gap": logit_gap, "adapter_effect": adapter_effect}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same"] == [True, True, True]
    assert report["logit_gap"] < 1e-4
    assert report["adapter_effect"] > 1e-3  # the adapters were applied, not a no-op

    # bard-vl infer, the server and the lmms-eval plugin load either directory (load_for_inference)
    from nemo_automodel_bard.serving.prompt import load_for_inference

    (model_a, processor_a), (model_m, processor_m) = (load_for_inference(d, device="cpu") for d in (adapter, final))
    assert model_a.config.block_size == model_m.config.block_size == 2
    inputs = processor_a(text=["<|im_start|>user\nwhat colour<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    assert torch.equal(model_a.generate(inputs, max_new_tokens=16), model_m.generate(inputs, max_new_tokens=16))


@pytest.mark.slow
def test_tiny_pipeline_with_lora_adapters(tmp_path):
    from hydra import compose, initialize_config_dir

    from nemo_automodel_bard.pipeline.app import config_dir, run_pipeline

    overrides = [f"work_dir={tmp_path}", "peft=lora", "data=shapes", "data.train_size=32",
                 "stages=[ar_pretrain,ar_init,pbm,swd,self_distill,evaluate]",
                 "ar_pretrain.max_steps=2", "ar_pretrain.vision_warmup_steps=0",
                 "pbm.block_sizes=[2,4]", "pbm.max_steps=2", "pbm.first_stage_steps=2", "pbm.block_steps=null",
                 "swd.anchor=fixed", "swd.teacher_block_size=2", "swd.student_block_sizes=[4]", "swd.max_steps=2",
                 "swd.control=false", "self_distill.block_size=4", "self_distill.max_steps=2",
                 "self_distill.num_prompts=4", "self_distill.keep=all", "self_distill.control=false",
                 "self_distill.max_new_tokens=16", "evaluate.num_samples=2", "evaluate.batch_size=2",
                 "evaluate.max_new_tokens=16", "evaluate.speed_samples=0", "evaluate.ar_baseline=false"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    outputs = run_pipeline(cfg, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    students = {k: v for k, v in manifest.items() if k.startswith(("pbm_b", "swd_kd_b", "self_distill"))
                and "trajectories" not in k}
    assert set(students) == {"pbm_b2", "pbm_b4", "swd_kd_b4", "self_distill"}
    for name, entry in students.items():
        out = entry["outputs"]
        assert "adapter_dir" in out, name  # a LoRA run: merged export + adapter directory
        adapter = Path(out["adapter_dir"].replace("{work_dir}", str(tmp_path.resolve())))
        assert (adapter / "adapter_model.safetensors").is_file()
        log = Path(out["log_dir"].replace("{work_dir}", str(tmp_path.resolve()))) / "training.jsonl"
        assert len(log.read_text().splitlines()) == 2
    assert "adapter_dir" not in manifest["ar_pretrain"]["outputs"]  # only the student stages use adapters
    results = [json.loads(Path(e["result_file"]).read_text()) for e in outputs["evaluate"]["entries"]]
    assert {"pbm_b4", "swd_kd_b4", "self_distill_b4"} <= {r["name"] for r in results}

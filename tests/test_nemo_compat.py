"""NeMo-AutoModel internals we adapt are where we expect them (fails loudly on a NeMo upgrade)."""

from __future__ import annotations

import pytest
import torch

from nemo_automodel_bard.recipes import nemo_compat


def test_installed_nemo_is_the_tested_release_and_every_private_hook_matches():
    """A NeMo upgrade fails here until recipes/common.py is re-checked against it and the digests updated."""
    assert nemo_compat.installed_nemo_version() == nemo_compat.TESTED_NEMO_VERSION
    assert nemo_compat.compat_report() == {"missing": [], "signature": [], "source": []}
    nemo_compat.check_nemo_compat(strict=True)


def test_a_changed_hook_is_reported_by_name(monkeypatch):
    recipe = nemo_compat._RECIPE

    def changed(self, batches):  # one parameter fewer than ours expects
        return None

    monkeypatch.setattr(recipe, "_run_train_optim_step", changed)
    report = nemo_compat.compat_report()
    assert any(line.startswith("FinetuneRecipeForVLM._run_train_optim_step") for line in report["signature"])
    assert report["source"] == ["FinetuneRecipeForVLM._run_train_optim_step"]
    with pytest.raises(nemo_compat.NemoCompatError, match=r"tested: 0\.7\.0\).*_run_train_optim_step\(self, batches\)"):
        nemo_compat.check_nemo_compat(strict=True)
    original = nemo_compat._resolve  # a hook that is gone (e.g. renamed in a later release)
    monkeypatch.setattr(nemo_compat, "_resolve", lambda name: None if name.endswith("._autocast_context") else original(name))
    assert "FinetuneRecipeForVLM._autocast_context" in nemo_compat.compat_report()["missing"]


def test_a_changed_body_only_warns_outside_the_suite(monkeypatch, caplog):
    monkeypatch.setitem(nemo_compat.REPLACED_SOURCES, "FinetuneRecipeForVLM._run_validation_epoch", "0" * 16)
    monkeypatch.setattr(nemo_compat, "_CHECKED", False)
    with caplog.at_level("WARNING"):
        report = nemo_compat.check_nemo_compat()
    assert report["source"] == ["FinetuneRecipeForVLM._run_validation_epoch"]
    assert "update REPLACED_SOURCES" in caplog.text
    with pytest.raises(nemo_compat.NemoCompatError, match="_run_validation_epoch"):
        nemo_compat.check_nemo_compat(strict=True)


def test_shims_are_scoped():
    import nemo_automodel.recipes.vlm.finetune as finetune

    original_build, original_reset = finetune.build_model, torch.cuda.reset_peak_memory_stats
    with nemo_compat.accept_custom_model_targets(), nemo_compat.cpu_cuda_guard():
        assert finetune.build_model is nemo_compat._build_model
        torch.cuda.reset_peak_memory_stats()  # no error on a CPU-only host
    assert finetune.build_model is original_build and torch.cuda.reset_peak_memory_stats is original_reset


def test_the_energon_loaders_hooks_are_checked(monkeypatch):
    """The typed-config attributes the Energon loaders replace and the build keywords they read."""
    from nemo_automodel.components.datasets.vlm import loader
    from nemo_automodel.recipes._typed_config import RecipeConfig

    monkeypatch.setattr(RecipeConfig, "vlm_dataloader", property(lambda self: None))

    def build(self, *, pretrained_model_name_or_path, rank, world_size, batch_size):  # renamed keywords
        return None

    monkeypatch.setattr(loader.VlmDataloaderConfig, "build", build)
    report = nemo_compat.compat_report()
    assert any("RecipeConfig.vlm_dataloader is no longer a cached property" in line for line in report["signature"])
    assert "vlm.loader.VlmDataloaderConfig.build lacks ['dp_rank', 'dp_world_size', 'dataset_build_context']" \
        in report["signature"]
    with pytest.raises(nemo_compat.NemoCompatError, match="vlm_dataloader"):
        nemo_compat.check_nemo_compat(strict=True)

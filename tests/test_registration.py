"""Registration: Auto classes, NeMo's registry, and the import alias in a fresh interpreter."""

from __future__ import annotations

import pytest

import subprocess
import sys
import textwrap

import torch


def _run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that has not imported our package; return stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_alias_import_gives_the_same_objects_in_a_fresh_interpreter():
    out = _run_fresh(
        """
        import sys
        assert "nemo_automodel_bard" not in sys.modules and "torch" not in sys.modules
        from nemo_automodel.components.models.bard_vl import BardVLForConditionalGeneration, BardVLConfig
        import nemo_automodel_bard
        from nemo_automodel.components.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration as M2
        import nemo_automodel.components.models.bard_vl as alias
        print(BardVLForConditionalGeneration is nemo_automodel_bard.BardVLForConditionalGeneration,
              BardVLConfig is nemo_automodel_bard.BardVLConfig, M2 is BardVLForConditionalGeneration,
              alias is sys.modules["nemo_automodel_bard.models.bard_vl"])
        """
    )
    assert out.split() == ["True", "True", "True", "True"]


def test_nemo_registry_resolves_the_architecture_from_the_entry_point():
    out = _run_fresh(
        """
        import sys
        from nemo_automodel._transformers.registry import get_registry
        assert "nemo_automodel_bard" not in sys.modules
        cls = get_registry().model_arch_name_to_cls["BardVLForConditionalGeneration"]
        print(cls.__module__, cls.__name__)
        """
    )
    assert out.split() == ["nemo_automodel_bard.models.bard_vl.modeling_bard_vl", "BardVLForConditionalGeneration"]


def test_unknown_nemo_model_packages_still_raise_nemo_error():
    out = _run_fresh(
        """
        try:
            import nemo_automodel.components.models.no_such_model
        except ModuleNotFoundError as exc:
            print("raised", "no_such_model" in str(exc))
        """
    )
    assert out.split() == ["raised", "True"]


def test_auto_classes_load_a_bard_vl_directory(tiny_model_dir):
    import nemo_automodel_bard  # noqa: F401 - registration on import
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from nemo_automodel_bard import BardVLConfig, BardVLForConditionalGeneration, BardVLProcessor
    from nemo_automodel_bard.models.bard_vl.registration import ARCHITECTURE

    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), BardVLConfig)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert type(model) is BardVLForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(tiny_model_dir)) is BardVLProcessor
    from nemo_automodel._transformers.registry import get_registry

    assert get_registry().model_arch_name_to_cls[ARCHITECTURE] is BardVLForConditionalGeneration


@pytest.mark.slow
def test_auto_model_from_pretrained_in_fresh_interpreter(tiny_model_dir):
    """With our package imported first, the Auto classes use the classes it registered (see test_hf_auto.py
    for a fresh interpreter without that import)."""
    out = _run_fresh(
        f"""
        import nemo_automodel_bard
        from transformers import AutoModelForImageTextToText
        m = AutoModelForImageTextToText.from_pretrained({str(tiny_model_dir)!r})
        print(type(m).__name__)
        """
    )
    assert out.split()[-1] == "BardVLForConditionalGeneration"

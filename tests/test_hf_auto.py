"""After installation, transformers' Auto classes and pipeline load a Bard-VL directory in a fresh interpreter
without importing our package first and without trust_remote_code."""

from __future__ import annotations

import pytest

import subprocess
import sys
import textwrap


def _run_fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.slow
def test_auto_classes_in_a_fresh_interpreter(tiny_model_dir):
    result = _run_fresh(
        f"""
        import json, sys
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        light = "nemo_automodel_bard" not in sys.modules  # importing transformers stays light
        path = {str(tiny_model_dir)!r}
        processor = AutoProcessor.from_pretrained(path)  # before any config: found by its saved class name
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
        from nemo_automodel_bard.models.bard_vl import BardVLConfig, BardVLForConditionalGeneration, BardVLProcessor
        print(json.dumps([light, type(processor) is BardVLProcessor, type(config) is BardVLConfig,
                          type(model) is BardVLForConditionalGeneration]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[true, true, true, true]"


@pytest.mark.slow
def test_model_first_in_a_fresh_interpreter(tiny_model_dir):
    result = _run_fresh(
        f"""
        from transformers import AutoModelForImageTextToText
        print(type(AutoModelForImageTextToText.from_pretrained({str(tiny_model_dir)!r})).__name__)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "BardVLForConditionalGeneration"


@pytest.mark.slow
def test_switched_off_registration_says_what_to_import(tiny_model_dir):
    result = _run_fresh(
        f"""
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained({str(tiny_model_dir)!r})
        except ValueError:
            print("unknown")
        import nemo_automodel_bard
        print(type(AutoConfig.from_pretrained({str(tiny_model_dir)!r})).__name__)
        """,
        NEMO_AUTOMODEL_BARD_AUTO_REGISTER="0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["unknown", "BardVLConfig"]


def test_stand_in_error_names_the_import(monkeypatch):
    import nemo_automodel_bard_alias as alias

    monkeypatch.setenv(alias.AUTO_REGISTER_ENV, "0")
    try:
        alias._real_config_class("bard_vl")
    except ImportError as exc:
        assert "import nemo_automodel_bard" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected ImportError")


@pytest.mark.slow
def test_pipeline_in_a_fresh_interpreter(tiny_model_dir, tmp_path):
    from nemo_automodel_bard.demo import write_demo_image

    image = write_demo_image(tmp_path / "x.png")
    result = _run_fresh(
        f"""
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(tiny_model_dir)!r})
        messages = [{{"role": "user", "content": [{{"type": "image", "image": {str(image)!r}}},
                                                  {{"type": "text", "text": "Describe."}}]}}]
        out = pipe(text=messages, max_new_tokens=4)
        print(type(pipe.model).__name__, type(pipe.processor).__name__, out[0]["generated_text"][-1]["role"])
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["BardVLForConditionalGeneration", "BardVLProcessor", "assistant"]

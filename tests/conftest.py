"""Shared fixtures: a tiny random Bard-VL checkpoint written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a tiny random Bard-VL directory (config, safetensors, tokenizer, processors)."""
    from nemo_automodel_bard.models.bard_vl.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "bard-vl-tiny", seed=0, block_size=4)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """A fresh fp32 eval-mode model loaded from the tiny directory (tests may mutate it)."""
    from nemo_automodel_bard import BardVLForConditionalGeneration

    return BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

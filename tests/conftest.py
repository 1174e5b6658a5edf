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
    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

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


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory, tiny_model_dir):
    """A complete model directory of a tiny Bard-VL trained for a few seconds on :data:`TOY_PAIRS`: it answers
    them confidently and stops with EOS, so token-identity checks (batched vs alone) are meaningful."""
    import shutil

    from helpers import TOY_PAIRS, toy_picture
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.fixtures.toy import make_example, train_toy

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("toy") / "bard-vl-toy"
        shutil.copytree(tiny_model_dir, out)
        processor = AutoProcessor.from_pretrained(out)
        examples = [make_example(processor, prompt, answer, image=toy_picture(*pic) if pic else None)
                    for prompt, answer, pic in TOY_PAIRS]
        model = BardVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        losses = train_toy(model, examples, steps=100, lr=3e-3, copies=8, seed=0)
        assert losses[-1] < 0.5, losses[-10:]
        model.save_pretrained(out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def loaded(toy_model_dir):
    """``(model, processor)`` of the toy model as the server and ``infer`` load it, on one torch thread."""
    from nemo_automodel_bard.serving.prompt import load_for_inference

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_for_inference(toy_model_dir, device="cpu")
    torch.set_num_threads(before)

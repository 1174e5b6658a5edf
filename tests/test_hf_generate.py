"""generate: which setting wins (published defaults, Bard vs Qwen-style generation configs) and the HF forms."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import BaseStreamer

from nemo_automodel_bard.models.bard_vl.configuration_bard_vl import BardVLConfig
from nemo_automodel_bard.models.bard_vl.generation_bard_vl import BardVLGenerateOutput, resolve_generate_options
from nemo_automodel_bard.fixtures.tiny import build_tiny_tokenizer, tiny_config

#: generation_config.json as Qwen3-VL checkpoints ship it (sampling defaults of an autoregressive model)
QWEN_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
}


@pytest.fixture(scope="module")
def published_config() -> BardVLConfig:
    """A config as the published code writes it: Qwen3-VL vocabulary, no block_size, no mask_token_id."""
    data = tiny_config(build_tiny_tokenizer(), block_size=8).to_dict()
    for key in ("block_size", "mask_token_id", "pad_block_token_id", "legacy_clean_sees_noisy", "transformers_version"):
        data.pop(key, None)
    data["text_config"]["vocab_size"] = 151936
    data["eos_token_id"] = data["text_config"]["eos_token_id"] = 151645
    data["pad_token_id"] = data["text_config"]["pad_token_id"] = 151643
    return BardVLConfig.from_dict(data)


def _model(config, generation: dict | GenerationConfig | None):
    if isinstance(generation, dict):
        generation = GenerationConfig(**generation)
    if generation is None:
        generation = GenerationConfig.from_model_config(config)
    return SimpleNamespace(config=config, generation_config=generation)


def test_published_checkpoint_decodes_with_published_defaults(published_config, caplog):
    from nemo_automodel_bard.models.bard_vl import generation_bard_vl

    generation_bard_vl._warned.clear()  # the warning is given once per process
    assert published_config.block_size == 4 and published_config.mask_token_id == 151671
    for generation in (None, QWEN_GENERATION):
        with caplog.at_level(logging.WARNING):
            opts = resolve_generate_options(_model(published_config, generation))
        assert (opts.block_size, opts.denoising_steps, opts.confidence_threshold) == (4, 4, 0.9)
        assert opts.remasking_strategy == "low_confidence_dynamic" and opts.mask_token_id == 151671
        assert (opts.temperature, opts.top_k, opts.top_p) == (0.0, 0, 1.0)  # greedy
    assert opts.eos_token_ids == (151645, 151643)  # non-sampling fields of the Qwen config still count
    assert any("decodes greedily" in r.getMessage() for r in caplog.records)


def test_caller_can_ask_for_sampling(published_config):
    model = _model(published_config, QWEN_GENERATION)
    opts = resolve_generate_options(model, do_sample=True)
    assert (opts.temperature, opts.top_k, opts.top_p) == (0.7, 20, 0.8)
    assert resolve_generate_options(model, temperature=0.5).temperature == 0.5  # the published API samples at T > 0
    opts = resolve_generate_options(model, generation_config=GenerationConfig(do_sample=True, temperature=0.3, block_size=8))
    assert (opts.temperature, opts.block_size, opts.denoising_steps) == (0.3, 8, 8)  # a Bard config: sampling counts
    with pytest.raises(ValueError, match="do_sample=False .* contradicts temperature=0.5"):
        resolve_generate_options(model, do_sample=False, temperature=0.5)
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0"):
        resolve_generate_options(model, do_sample=True, temperature=0.0)


def test_bard_generation_config_and_arguments_win(published_config):
    bard = {"block_size": 8, "denoising_steps": 2, "confidence_threshold": 0.5, "remasking_strategy":
            "low_confidence_static", "do_sample": True, "temperature": 0.6, "top_k": 5, "eos_token_id": 151645}
    model = _model(published_config, bard)
    opts = resolve_generate_options(model)
    assert (opts.block_size, opts.denoising_steps, opts.confidence_threshold) == (8, 2, 0.5)
    assert opts.remasking_strategy == "low_confidence_static"
    assert (opts.temperature, opts.top_k, opts.top_p) == (0.6, 5, 1.0)
    opts = resolve_generate_options(model, block_size=2, denoising_steps=1, do_sample=False)
    assert (opts.block_size, opts.denoising_steps, opts.temperature) == (2, 1, 0.0)
    # positional published order: max_new_tokens, block_size, denoising_steps, ...
    assert resolve_generate_options(model, 12, 16, 4).block_size == 16
    # a generation_config argument replaces the checkpoint's
    assert resolve_generate_options(model, generation_config=GenerationConfig(block_size=16)).denoising_steps == 16


def test_config_block_size_counts_without_bard_generation_config(published_config):
    config = BardVLConfig.from_dict({**published_config.to_dict(), "block_size": 16})
    opts = resolve_generate_options(_model(config, QWEN_GENERATION))
    assert (opts.block_size, opts.denoising_steps, opts.temperature) == (16, 16, 0.0)


@pytest.mark.parametrize(
    "option, value",
    [("num_beams", 4), ("num_return_sequences", 2), ("repetition_penalty", 1.2), ("output_scores", True),
     ("penalty_alpha", 0.6), ("stop_strings", ["x"])],
)
def test_unsupported_options_are_refused_by_name(published_config, option, value):
    with pytest.raises(ValueError, match=rf"does not support {option}=.*supported: max_new_tokens"):
        resolve_generate_options(_model(published_config, None), **{option: value})


def test_unknown_option_lists_what_is_supported(published_config):
    with pytest.raises(TypeError, match=r"unknown options \['blok_size'\]; options: max_new_tokens, block_size.*model inputs: input_ids"):
        resolve_generate_options(_model(published_config, None), blok_size=4)


def test_unsupported_options_in_generation_config(published_config):
    with pytest.raises(ValueError, match="num_beams=3 \\(generation_config argument\\)"):
        resolve_generate_options(_model(published_config, None), generation_config=GenerationConfig(num_beams=3))
    # from the checkpoint's own file they are ignored with a warning (the checkpoint stays usable)
    opts = resolve_generate_options(_model(published_config, {**QWEN_GENERATION, "repetition_penalty": 1.05}))
    assert opts.block_size == 4


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def published_style_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with config.json lacking block_size and a Qwen-style generation_config.json."""
    out = tmp_path_factory.mktemp("published") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    del config["block_size"]
    (out / "config.json").write_text(json.dumps(config))
    eos = config["eos_token_id"]
    generation = {**QWEN_GENERATION, "bos_token_id": eos, "pad_token_id": eos, "eos_token_id": [eos]}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


@pytest.fixture(scope="module")
def prompt(tiny_processor):
    text = "<|im_start|>user\nwhat colour<|im_end|>\n<|im_start|>assistant\n"
    return tiny_processor(text=[text], return_tensors="pt")


def test_published_style_checkpoint_generates_greedily_with_block_4(published_style_dir, prompt):
    from nemo_automodel_bard import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(published_style_dir, dtype=torch.float32).eval()
    assert model.generation_config.do_sample is True  # the Qwen-style file was loaded
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ids, stats = model.generate(prompt, max_new_tokens=12, return_step_stats=True)
        outputs.append(ids)
        assert (stats["block_size"], stats["denoising_steps"], stats["confidence_threshold"]) == (4, 4, 0.9)
    assert torch.equal(outputs[0], outputs[1])
    explicit = model.generate(prompt, max_new_tokens=12, block_size=4, denoising_steps=4, temperature=0.0,
                              confidence_threshold=0.9)
    assert torch.equal(outputs[0], explicit)


def test_hf_call_forms(tiny_model, prompt, capsys):
    from transformers import AutoTokenizer, TextStreamer

    kwargs = {"max_new_tokens": 16, "block_size": 4, "denoising_steps": 4}
    reference = tiny_model.generate(prompt, **kwargs)
    assert torch.equal(tiny_model.generate(**prompt, **kwargs), reference)
    assert torch.equal(tiny_model.generate(input_ids=prompt["input_ids"], **kwargs), reference)
    assert torch.equal(tiny_model.generate(**prompt, do_sample=False, use_cache=True, **kwargs), reference)

    out = tiny_model.generate(**prompt, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, BardVLGenerateOutput) and torch.equal(out.sequences, reference)
    assert out.step_stats["num_response_tokens"] == reference.shape[1] and out.step_stats["block_size"] == 4

    prompt_len = prompt["input_ids"].shape[1]
    via_length = tiny_model.generate(**prompt, max_length=prompt_len + 16, block_size=4, denoising_steps=4)
    assert torch.equal(via_length, reference)

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], 0

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended += 1

    streamer = Collect()
    blocks_seen = []
    ids = tiny_model.generate(**prompt, streamer=streamer, block_callback=lambda k, t, f: blocks_seen.append(k),
                              **kwargs)
    assert torch.equal(ids, reference) and streamer.ended == 1
    assert torch.equal(streamer.puts[0], prompt["input_ids"])  # HF convention: the prompt first
    assert len(streamer.puts) - 1 == len(blocks_seen) == -(-reference.shape[1] // 4)  # then one put per block
    assert all(p.shape[1] <= 4 for p in streamer.puts[1:])
    assert torch.equal(torch.cat(streamer.puts[1:], dim=1), reference)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model.name_or_path)
    capsys.readouterr()
    tiny_model.generate(**prompt, streamer=TextStreamer(tokenizer, skip_prompt=True), **kwargs)
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(reference[0]) + "\n"


def test_do_sample_samples(tiny_model, prompt):
    kwargs = {"max_new_tokens": 16, "block_size": 4, "denoising_steps": 4, "do_sample": True, "temperature": 5.0}
    draws = set()
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        draws.add(tuple(tiny_model.generate(**prompt, generator=generator, **kwargs)[0].tolist()))
    assert len(draws) > 1
    with pytest.raises(ValueError, match="num_beams=2"):
        tiny_model.generate(**prompt, num_beams=2)

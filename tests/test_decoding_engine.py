"""Block-diffusion decoding engine on a tiny Bard-VL trained for a few seconds.

The model memorises three prompt -> answer pairs (two with images of different sizes), so its
confidences are meaningful (sure of most tokens, unsure of some), it stops with EOS by itself, and
token-identity checks are not at the mercy of near-ties.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import boost_logits
import torch
from PIL import Image

from nemo_automodel_bard.decoding import block_diffusion_generate, render_trajectory
from nemo_automodel_bard.fixtures.toy import batch_examples, make_example, train_toy

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    spec = importlib.util.spec_from_file_location("reference_decoder", ROOT / "benchmarks" / "reference_decoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention)
    yield
    torch.set_num_threads(before)


def _picture(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2] = color
    array[height // 2 :, : width // 2] = (250, 250, 250)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def toy(tiny_model_dir):
    """(model, processor, examples): a tiny Bard-VL trained on three pairs, and its state."""
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration

    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    examples = [
        make_example(processor, "Describe the image.", "red circle row 1 column 2, blue square row 2 column 3",
                     image=_picture(64, 64, (200, 30, 30))),
        make_example(processor, "List every shape.", "green triangle row 3 column 1, yellow star row 1 column 1",
                     image=_picture(128, 96, (30, 200, 30))),
        make_example(processor, "How many shapes are there?", "There are 4 shapes."),
    ]
    model = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    losses = train_toy(model, examples, steps=100, lr=3e-3, copies=8, seed=0)
    assert losses[-1] < 0.5, losses[-10:]
    return model, processor, examples


@pytest.fixture()
def model(toy):
    """The trained model with any forward wrapper removed again after the test."""
    m = toy[0]
    yield m
    m.__dict__.pop("forward", None)


def _count_forwards(model) -> list:
    calls = []
    original = model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    model.forward = counted
    return calls


_boost = boost_logits


def _response_start(model, inputs) -> int:
    pos = model.position_ids_for(inputs["input_ids"], mm_token_type_ids=inputs.get("mm_token_type_ids"),
                                 image_grid_thw=inputs.get("image_grid_thw"))
    return int(pos.max()) + 1


# ------------------------------------------------------------------------------------------ fused vs separate
@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_fused_equals_separate_and_reference(model, toy, block_size):
    _, processor, examples = toy
    eos = model.config.eos_token_id
    for example in (examples[0],):  # an image in the prompt
        for rule, threshold, steps in [
            ("low_confidence_static", 0.9, block_size),
            ("low_confidence_static", 0.9, max(1, block_size // 2)),
            ("low_confidence_dynamic", 0.5, block_size),
            ("low_confidence_dynamic", 0.99, max(1, block_size // 2)),
        ]:
            kwargs = dict(max_new_tokens=48, block_size=block_size, denoising_steps=steps,
                          remasking_strategy=rule, confidence_threshold=threshold, return_step_stats=True)
            calls = _count_forwards(model)
            fused, fs = model.generate(example.inputs, **kwargs)
            assert len(calls) == fs["forwards_total"]
            calls.clear()
            separate, ss = model.generate(example.inputs, fused_commit=False, fused_prefill=False, **kwargs)
            assert len(calls) == ss["forwards_total"]
            model.__dict__.pop("forward")
            ref, rs = reference.reference_generate(model, example.inputs, 48, block_size, steps,
                                                   remasking_strategy=rule, confidence_threshold=threshold)
            label = (rule, threshold, steps)
            assert torch.equal(fused, separate), label
            assert torch.equal(fused, ref), (label, fused, ref)
            assert fused[0, -1].item() == eos or fused.shape[1] == 48
            # exactly one forward per block fewer, except after the last block, and the prefill is block 0's
            # first denoising step
            n = fs["num_blocks"]
            assert ss["num_blocks"] == n == len(rs["block_step_counts"])
            assert fs["block_step_counts"] == ss["block_step_counts"], label
            # the reference denoises a block to its end; the engine stops a block once it has committed EOS with
            # everything before it (eos_exit): same tokens, never more steps, and eos_exit=False gives its counts
            assert all(f <= r for f, r in zip(fs["block_step_counts"], rs["block_step_counts"])), label
            if fs["block_step_counts"] != rs["block_step_counts"]:
                full, full_stats = model.generate(example.inputs, eos_exit=False, **kwargs)
                assert torch.equal(full, fused) and full_stats["block_step_counts"] == rs["block_step_counts"], label
            assert fs["forwards_total"] == sum(fs["block_step_counts"])
            assert ss["forwards_total"] == 1 + sum(ss["block_step_counts"]) + (n - 1)
            assert ss["forwards_total"] - fs["forwards_total"] == n
            assert rs["forwards_total"] - ss["forwards_total"] == sum(rs["block_step_counts"]) - sum(ss["block_step_counts"])
            assert fs["commit_forwards"] == 0 and ss["commit_forwards"] == rs["commit_forwards"] == n - 1
            assert fs["num_response_tokens"] == rs["num_response_tokens"] == fused.shape[1]


def test_thresholds_change_the_number_of_steps(model, toy):
    """Sanity of the fixture: the trained model is sure of some tokens and unsure of others."""
    _, _, examples = toy
    counts = {}
    for threshold in (0.5, 0.99):
        _, stats = model.generate(examples[1].inputs, max_new_tokens=48, block_size=8, denoising_steps=8,
                                  confidence_threshold=threshold, return_step_stats=True)
        counts[threshold] = sum(stats["block_step_counts"])
    assert counts[0.5] < counts[0.99]


# ------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("fused", [True, False])
def test_batch_output_equals_single_output(model, toy, fused):
    _, processor, examples = toy
    assert processor.tokenizer.padding_side == "left"
    order = [examples[2], examples[0], examples[1], examples[2]]  # mixed lengths, two image sizes
    batch = batch_examples(processor, order)
    assert not bool(batch["attention_mask"].all()), "the batch should need padding"
    pad = processor.tokenizer.pad_token_id
    for rule, threshold, block in [("low_confidence_dynamic", 0.9, 4), ("low_confidence_static", 0.9, 8)]:
        kwargs = dict(max_new_tokens=40, block_size=block, denoising_steps=block, remasking_strategy=rule,
                      confidence_threshold=threshold, return_step_stats=True, fused_commit=fused)
        out, stats = model.generate(batch, **kwargs)
        singles = {}
        for i, example in enumerate(order):
            if id(example) not in singles:
                singles[id(example)] = model.generate(example.inputs, **kwargs)
            alone, alone_stats = singles[id(example)]
            n = alone.shape[1]
            assert torch.equal(out[i, :n], alone[0]), (i, rule)
            assert bool((out[i, n:] == pad).all()), "after EOS comes padding"
            assert stats["response_tokens_per_sample"][i] == n
            assert stats["block_step_counts"][i][: alone_stats["num_blocks"]] == alone_stats["block_step_counts"]
            assert all(s == 0 for s in stats["block_step_counts"][i][alone_stats["num_blocks"] :])
            # a sample's own forwards in the batch are exactly what it costs decoded alone
            assert stats["forwards_per_sample"][i] == alone_stats["forwards_total"] == alone_stats["forwards_per_sample"][0]
        assert stats["num_response_tokens"] == sum(stats["response_tokens_per_sample"])


def test_fused_prefill_gives_the_same_tokens_with_one_forward_less_per_sample(model, toy):
    """Mixed prompt lengths (left padding) and image sizes: the fused prefill decodes exactly the separate
    prefill's tokens, the same steps per block, and every sample takes one forward less."""
    _, processor, examples = toy
    batch = batch_examples(processor, [examples[2], examples[0], examples[1]])
    for rule, threshold, block in [("low_confidence_dynamic", 0.9, 4), ("low_confidence_static", 0.9, 8),
                                   ("low_confidence_budget", 0.5, 8), ("margin_dynamic", 0.7, 16)]:
        kwargs = dict(max_new_tokens=40, block_size=block, denoising_steps=block, remasking_strategy=rule,
                      confidence_threshold=threshold, return_step_stats=True)
        calls = _count_forwards(model)
        fused, fs = model.generate(batch, **kwargs)
        assert len(calls) == fs["forwards_total"]
        calls.clear()
        separate, ss = model.generate(batch, fused_prefill=False, **kwargs)
        assert len(calls) == ss["forwards_total"]
        model.__dict__.pop("forward")
        label = (rule, threshold, block)
        assert torch.equal(fused, separate), label
        assert fs["block_step_counts"] == ss["block_step_counts"], label
        assert fs["forwards_total"] == ss["forwards_total"] - 1, label
        assert fs["forwards_per_sample"] == [n - 1 for n in ss["forwards_per_sample"]], label
        assert fs["prefill_forwards"] == ss["prefill_forwards"] == 1, label
        assert fs["denoising_forwards"] == ss["denoising_forwards"] - 1, label
        assert fs["num_denoising_steps"] == ss["num_denoising_steps"], label
        assert fs["fused_prefill"] and not ss["fused_prefill"]


def test_right_padding_gives_the_same_tokens(model, toy):
    _, processor, examples = toy
    left = batch_examples(processor, [examples[2], examples[0]])
    processor.tokenizer.padding_side = "right"
    try:
        right = batch_examples(processor, [examples[2], examples[0]])
    finally:
        processor.tokenizer.padding_side = "left"
    kwargs = dict(max_new_tokens=32, block_size=4, denoising_steps=4, confidence_threshold=0.9)
    assert torch.equal(model.generate(left, **kwargs), model.generate(right, **kwargs))


# ------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize("block_size,steps", [(4, 4), (8, 4), (8, 8)])
def test_dynamic_with_threshold_at_least_one_is_static(model, toy, block_size, steps):
    _, _, examples = toy
    kwargs = dict(max_new_tokens=32, block_size=block_size, denoising_steps=steps, return_step_stats=True)
    static, s1 = model.generate(examples[1].inputs, remasking_strategy="low_confidence_static", **kwargs)
    for threshold in (1.0,):
        dynamic, s2 = model.generate(examples[1].inputs, remasking_strategy="low_confidence_dynamic",
                                     confidence_threshold=threshold, **kwargs)
        assert torch.equal(static, dynamic)
        assert s1["block_step_counts"] == s2["block_step_counts"] == [min(steps, block_size)] * s1["num_blocks"]


# ------------------------------------------------------------------------------------------ stats and EOS
def test_stats_count_every_forward_and_stop_at_a_forced_eos(model, toy):
    _, processor, examples = toy
    eos = model.config.eos_token_id
    pad = processor.tokenizer.pad_token_id
    example = examples[1]  # a 22-token answer
    kwargs = dict(max_new_tokens=64, block_size=4, denoising_steps=4, confidence_threshold=0.9)
    free = model.generate(example.inputs, **kwargs)
    assert free.shape[1] > 8
    start = _response_start(model, example.inputs)
    _boost(model, lambda b, pos, tok: (eos, 50.0) if pos == start + 5 else None)
    calls = _count_forwards(model)
    ids, stats = model.generate(example.inputs, return_step_stats=True, **kwargs)
    assert ids.shape == (1, 6) and ids[0, 5].item() == eos
    assert torch.equal(ids[0, :4], free[0, :4])  # the first block is untouched by the hook
    assert stats["num_response_tokens"] == 6 and stats["response_tokens_per_sample"] == [6]
    assert stats["num_blocks"] == 2 and len(stats["block_step_counts"]) == 2
    assert stats["forwards_total"] == len(calls) == 1 + stats["denoising_forwards"] + stats["commit_forwards"]
    assert stats["prefill_forwards"] == 1 and stats["fused_prefill"]  # the prefill was block 0's first step
    assert stats["num_denoising_steps"] == stats["denoising_forwards"] + 1 == sum(stats["block_step_counts"])
    assert stats["tpf"] == pytest.approx(6 / stats["num_denoising_steps"])
    assert stats["tokens_per_forward"] == pytest.approx(6 / stats["forwards_total"])
    assert stats["tokens_per_second"] > 0 and stats["elapsed_s"] > 0

    # batch: EOS forced in sample 0 only; sample 1 decodes its full answer; padding after EOS
    model.__dict__.pop("forward")
    other = model.generate(examples[0].inputs, **kwargs)
    batch = batch_examples(processor, [example, examples[0]])
    start0 = _response_start(model, example.inputs)  # left padding does not move positions
    _boost(model, lambda b, pos, tok: (eos, 50.0) if b == 0 and pos == start0 + 5 else None)
    calls = _count_forwards(model)
    out, stats = model.generate(batch, return_step_stats=True, **kwargs)
    n1 = other.shape[1]
    assert stats["response_tokens_per_sample"] == [6, n1]
    assert stats["num_response_tokens"] == 6 + n1
    assert out.shape[1] == max(6, n1)
    assert out[0, 5].item() == eos and bool((out[0, 6:] == pad).all())
    assert torch.equal(out[1, :n1], other[0])
    assert stats["forwards_total"] == len(calls)
    assert stats["block_step_counts"][0][2:] == [0] * (stats["num_blocks"] - 2)  # sample 0 stopped


def test_max_new_tokens_cuts_inside_a_block(model, toy):
    _, _, examples = toy
    kwargs = dict(block_size=4, denoising_steps=4, remasking_strategy="low_confidence_static")
    longer = model.generate(examples[1].inputs, max_new_tokens=48, **kwargs)
    assert longer.shape[1] > 8 and not bool((longer[0, :7] == model.config.eos_token_id).any())
    ids, stats = model.generate(examples[1].inputs, max_new_tokens=7, return_step_stats=True, **kwargs)
    assert ids.shape == (1, 7) and stats["num_response_tokens"] == 7 and stats["num_blocks"] == 2
    assert torch.equal(ids[0], longer[0, :7])


# ------------------------------------------------------------------------------------------ config defaults
def test_defaults_come_from_the_generation_config(model, toy, tiny_model_dir):
    from nemo_automodel_bard import BardVLForConditionalGeneration

    _, _, examples = toy
    loaded = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = loaded.generation_config
    assert gen.block_size == 4 and gen.remasking_strategy == "low_confidence_dynamic"
    _, stats = loaded.generate(examples[2].inputs, max_new_tokens=8, return_step_stats=True)
    assert stats["block_size"] == gen.block_size and stats["denoising_steps"] == gen.denoising_steps
    assert stats["remasking_strategy"] == gen.remasking_strategy
    assert stats["confidence_threshold"] == pytest.approx(gen.confidence_threshold)

    saved = model.generation_config
    try:
        model.generation_config = saved.__class__.from_dict(saved.to_dict())
        model.generation_config.block_size = 2
        model.generation_config.denoising_steps = 1
        model.generation_config.remasking_strategy = "low_confidence_static"
        model.generation_config.confidence_threshold = 0.3
        model.generation_config.max_new_tokens = 12
        implicit, stats = model.generate(examples[1].inputs, return_step_stats=True)
        assert (stats["block_size"], stats["denoising_steps"], stats["remasking_strategy"]) == (2, 1, "low_confidence_static")
        assert stats["block_step_counts"] == [1] * 6 and implicit.shape[1] == 12
        explicit = model.generate(examples[1].inputs, max_new_tokens=12, block_size=2, denoising_steps=1,
                                  remasking_strategy="low_confidence_static", confidence_threshold=0.3)
        assert torch.equal(implicit, explicit)
        # explicit arguments win over the generation config
        _, stats = model.generate(examples[1].inputs, block_size=4, return_step_stats=True)
        assert stats["block_size"] == 4 and stats["denoising_steps"] == 1
    finally:
        model.generation_config = saved


# ------------------------------------------------------------------------------------------ streaming, trajectory
def test_block_callback_streams_blocks_in_order(model, toy):
    _, processor, examples = toy
    batch = batch_examples(processor, [examples[0], examples[2]])
    seen = []
    out, stats = model.generate(batch, max_new_tokens=40, block_size=4, denoising_steps=4, return_step_stats=True,
                                block_callback=lambda k, tokens, finished: seen.append((k, tokens, finished)))
    assert [k for k, _, _ in seen] == list(range(stats["num_blocks"]))
    streamed = torch.cat([tokens for _, tokens, _ in seen], dim=1)
    assert torch.equal(streamed[:, : out.shape[1]], out)
    mask_id = model.config.mask_token_id
    assert not bool((streamed == mask_id).any())
    finished = torch.stack([f for _, _, f in seen])
    assert bool((finished[1:] >= finished[:-1]).all()) and bool(finished[-1].all())
    n2 = stats["response_tokens_per_sample"][1]
    first_done = int(finished[:, 1].long().argmax())
    assert first_done == (n2 - 1) // 4  # the short answer finishes in the block holding its EOS


def test_trajectory_is_recorded_and_rendered(model, toy, tmp_path):
    _, processor, examples = toy
    ids, stats = model.generate(examples[1].inputs, max_new_tokens=48, block_size=8, denoising_steps=8,
                                confidence_threshold=0.99, return_step_stats=True, record_trajectory=True)
    trajectory = stats["trajectory"]
    assert [entry["block"] for entry in trajectory] == list(range(stats["num_blocks"]))
    for entry, steps in zip(trajectory, stats["block_step_counts"]):
        committed = entry["committed_at"][0]
        assert bool((committed >= 0).all()) and int(committed.max()) == steps - 1
        assert entry["confidence"].shape == (1, 8)
    flat = torch.cat([entry["tokens"] for entry in trajectory], dim=1)
    assert torch.equal(flat[:, : ids.shape[1]], ids)
    for tokenizer, name in ((processor.tokenizer, "with_text.png"), (None, "steps_only.png")):
        path = render_trajectory(stats, tmp_path / name, tokenizer=tokenizer)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
    with pytest.raises(ValueError, match="record_trajectory"):
        render_trajectory({"tpf": 1.0}, tmp_path / "none.png")


# ------------------------------------------------------------------------------------------ no host syncs
def _code_without_docstrings(function) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def test_inner_loop_is_batched_without_host_syncs():
    from nemo_automodel_bard.decoding import engine, unmasking

    functions = {
        "denoise_block": engine._BlockDecoder.denoise_block,
        "BlockRun.step": engine.BlockRun.step,
        "BlockRun._commit": engine.BlockRun._commit,
        "greedy_step": engine.greedy_step,
        "close_at_eos": engine.close_at_eos,
        "propose_tokens": unmasking.propose_tokens,
        "select_commits": unmasking.select_commits,
    }
    for name, function in functions.items():
        code = _code_without_docstrings(function)
        assert ".item(" not in code and ".tolist(" not in code, name
        assert not re.search(r"\bfor\b .* \bin\b", code), f"{name} has a Python for-loop"
        assert ".cpu(" not in code and "numpy(" not in code, name
    # the single per-step sync is the "is this block done for everyone" check
    assert _code_without_docstrings(engine.BlockRun.step).count("bool(") == 1


def test_block_diffusion_generate_is_the_model_generate(model, toy):
    _, _, examples = toy
    a = model.generate(examples[0].inputs, 32, 4, 4, 0.0, 0, 1.0, "low_confidence_dynamic", 0.9, False)
    b = block_diffusion_generate(model, examples[0].inputs, max_new_tokens=32, block_size=4, denoising_steps=4,
                                 confidence_threshold=0.9)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ end-of-answer exit
def test_eos_exit_gives_the_same_tokens_with_fewer_forwards(model, toy):
    """A block ends for a sample once it holds a committed EOS with everything before it committed: the
    output equals decoding every position of the block (eos_exit=False), the forwards never grow, the
    statistics equal the forwards counted, and with an EOS early in a block they shrink."""
    _, processor, examples = toy
    eos = model.config.eos_token_id
    saved = 0
    settings = [(b, rule, thr, steps) for b in (4, 8, 16)
                for rule, thr, steps in (("low_confidence_dynamic", 0.9, None), ("low_confidence_dynamic", 0.5, None),
                                         ("low_confidence_static", 0.9, None), ("low_confidence_dynamic", 0.9, 2))]
    batch = batch_examples(processor, [examples[1], examples[0], examples[2]])
    for forced_at in (None, 5, 9):
        for block_size, rule, threshold, steps in settings:
            model.__dict__.pop("forward", None)
            if forced_at is not None:
                start = _response_start(model, examples[1].inputs)  # sample 0 of the batch: EOS forced there
                _boost(model, lambda b, pos, tok, at=start + forced_at: (eos, 50.0) if b == 0 and pos == at else None)
            kwargs = dict(max_new_tokens=48, block_size=block_size, denoising_steps=steps or block_size,
                          remasking_strategy=rule, confidence_threshold=threshold, return_step_stats=True)
            calls = _count_forwards(model)
            full, full_stats = model.generate(batch, eos_exit=False, **kwargs)
            calls.clear()
            fast, fast_stats = model.generate(batch, **kwargs)
            label = (forced_at, block_size, rule, threshold, steps)
            assert torch.equal(fast, full), label
            assert fast_stats["forwards_total"] == len(calls), label
            assert fast_stats["forwards_total"] <= full_stats["forwards_total"], label
            per_fast, per_full = fast_stats["forwards_per_sample"], full_stats["forwards_per_sample"]
            assert all(a <= b for a, b in zip(per_fast, per_full)), label
            assert fast_stats["response_tokens_per_sample"] == full_stats["response_tokens_per_sample"], label
            saved += sum(per_full) - sum(per_fast)
    model.__dict__.pop("forward", None)
    assert saved > 0


def test_eos_exit_on_a_single_sample_stops_the_block(model, toy):
    """An EOS committed at the second position of a block with the first committed: with ``eos_exit``
    the block takes fewer denoising steps than one that also decodes the positions after the EOS."""
    _, _, examples = toy
    eos = model.config.eos_token_id
    example = examples[1]
    start = _response_start(model, example.inputs)
    # EOS at offset 1 of block 1 (B=8); every later position gets flat logits (confidence 1/V: one commit a step)
    original = model.forward

    def forced(*args, **kwargs):
        out = original(*args, **kwargs)
        rows = kwargs.get("logits_positions")
        if rows is not None and rows.numel():
            positions = kwargs["position_ids"][0].reshape(-1)[rows]
            out.logits[positions == start + 9, eos] += 50.0
            out.logits[positions > start + 9] = 0.0
        return out

    model.forward = forced
    kwargs = dict(max_new_tokens=32, block_size=8, denoising_steps=8, confidence_threshold=0.9, return_step_stats=True)
    full, full_stats = model.generate(example.inputs, eos_exit=False, **kwargs)
    fast, fast_stats = model.generate(example.inputs, **kwargs)
    model.__dict__.pop("forward", None)
    assert torch.equal(fast, full) and fast[0, -1].item() == eos and fast.shape[1] == 10
    assert fast_stats["block_step_counts"][0] == full_stats["block_step_counts"][0]
    assert fast_stats["block_step_counts"][1] < full_stats["block_step_counts"][1]
    assert fast_stats["forwards_total"] < full_stats["forwards_total"]

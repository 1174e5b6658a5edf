"""``compile=True``: the static KV cache, the fixed-shape masks and the compiled step give the eager decoder's tokens.

Two layers of checks. The static cache, its masks and the fused greedy step are pure decoding logic: they are
checked on every rule, with padding, images, video, sampling, revision and the published commit/prefill, with the
compiler replaced by the identity (fast). Then the real ``torch.compile`` runs a few settings (its numerics, no
graph break, no recompilation on a second call), the block decoder and the AR baseline.
"""

from __future__ import annotations

import pytest
from helpers import TOY_PAIRS, one_thread, toy_picture  # noqa: F401 - fixture
import torch

from nemo_automodel_bard.decoding import block_diffusion_generate, static
from nemo_automodel_bard.decoding.autoregressive import ar_generate
from nemo_automodel_bard.fixtures.toy import batch_examples, make_example


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture()
def uncompiled(monkeypatch, loaded):
    """The static path with the identity as compiler (the decoding logic without torch.compile)."""
    model = loaded[0]
    static.reset_compiled(model)
    monkeypatch.setattr(static, "COMPILER", lambda function, **_: function)
    yield
    static.reset_compiled(model)


@pytest.fixture(scope="module")
def batch(loaded):
    """Three toy prompts (two with images of different sizes, one text-only), left-padded."""
    model, processor = loaded
    examples = [make_example(processor, prompt, answer, image=toy_picture(*pic) if pic else None)
                for prompt, answer, pic in TOY_PAIRS]
    return batch_examples(processor, examples)


def test_static_length_buckets():
    assert static.static_length(1) == 64
    for needed in range(1, 5000, 7):
        length = static.static_length(needed)
        assert length >= needed
        assert needed <= 64 or length <= 1.25 * needed
    # similar lengths share a bucket
    assert len({static.static_length(n) for n in range(225, 257)}) == 1


SETTINGS = [
    dict(block_size=4, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.9),
    dict(block_size=8, remasking_strategy="low_confidence_dynamic", confidence_threshold=0.5),
    dict(block_size=4, remasking_strategy="low_confidence_static"),
    dict(block_size=4, denoising_steps=2, remasking_strategy="low_confidence_static"),
    dict(block_size=8, remasking_strategy="low_confidence_budget", confidence_threshold=0.8),
    dict(block_size=4, remasking_strategy="margin_dynamic", confidence_threshold=0.3),
    dict(block_size=4, remasking_strategy="entropy_static"),
    dict(block_size=4, remasking_strategy="random"),
    dict(block_size=4, fused_commit=False, fused_prefill=False),
    dict(block_size=4, eos_exit=False),
    dict(block_size=4, revise=True, confidence_threshold=0.5),
    dict(block_size=4, temperature=0.8, top_k=5),
    dict(block_size=4, record_trajectory=True),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_static_cache_decodes_the_eager_tokens(loaded, batch, uncompiled, setting):
    model = loaded[0]
    kwargs = dict(max_new_tokens=24, return_step_stats=True, **setting)
    seeded = setting.get("temperature") or setting.get("remasking_strategy") == "random"
    results = []
    for compile_ in (False, True):
        generator = torch.Generator().manual_seed(0) if seeded else None
        results.append(block_diffusion_generate(model, batch, compile=compile_, generator=generator, **kwargs))
    (eager, eager_stats), (fixed, fixed_stats) = results
    assert torch.equal(eager, fixed)
    for key in ("forwards_total", "forwards_per_sample", "block_step_counts", "num_response_tokens"):
        assert eager_stats[key] == fixed_stats[key], key
    if setting.get("record_trajectory"):
        for a, b in zip(eager_stats["trajectory"], fixed_stats["trajectory"]):
            assert torch.equal(a["committed_at"], b["committed_at"])


def test_static_cache_with_video(tiny_model, tiny_processor, tmp_path, monkeypatch):
    from test_decoding_media import _video_batch

    from nemo_automodel_bard.demo import write_demo_video

    monkeypatch.setattr(static, "COMPILER", lambda function, **_: function)
    video = _video_batch(tiny_processor, write_demo_video(tmp_path / "clip.mp4"))
    kwargs = dict(max_new_tokens=16, block_size=4, denoising_steps=2)
    assert torch.equal(tiny_model.generate(video, **kwargs), tiny_model.generate(video, compile=True, **kwargs))


def test_static_cache_ar_decodes_the_eager_tokens(loaded, batch, uncompiled):
    model = loaded[0]
    eos = model.config.eos_token_id
    eager, eager_stats = ar_generate(model, batch, 24, eos_token_id=eos)
    fixed, fixed_stats = ar_generate(model, batch, 24, eos_token_id=eos, compile=True)
    assert torch.equal(eager, fixed)
    assert eager_stats["forwards_total"] == fixed_stats["forwards_total"]
    sampled = [ar_generate(model, batch, 24, eos_token_id=eos, compile=c, temperature=0.7,
                           generator=torch.Generator().manual_seed(1))[0] for c in (False, True)]
    assert torch.equal(*sampled)


def test_flex_attention_model_is_refused(tiny_model_dir, tiny_processor):
    from nemo_automodel_bard import BardVLForConditionalGeneration

    model = BardVLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                           attn_implementation="flex_attention").eval()
    ids = tiny_processor.tokenizer(["hello"], return_tensors="pt")
    with pytest.raises(ValueError, match="compile=True needs the dense attention path"):
        block_diffusion_generate(model, dict(ids), max_new_tokens=8, block_size=4, compile=True)


@pytest.mark.slow
def test_torch_compile_gives_the_eager_tokens_without_recompiling(loaded, batch):
    """The real compiler: identical tokens and statistics for the block decoder (the fused greedy graph, and the
    compiled forward with eager commits under revision) and for the AR baseline; no graph break; a second call
    with the same shapes compiles nothing."""
    from torch._dynamo.utils import counters

    model = loaded[0]
    static.reset_compiled(model)
    counters.clear()
    kwargs = dict(max_new_tokens=24, block_size=4, confidence_threshold=0.9, return_step_stats=True)
    eager, eager_stats = block_diffusion_generate(model, batch, **kwargs)
    compiled, compiled_stats = block_diffusion_generate(model, batch, compile=True, **kwargs)
    assert torch.equal(eager, compiled)
    assert eager_stats["forwards_per_sample"] == compiled_stats["forwards_per_sample"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    again = block_diffusion_generate(model, batch, compile=True, **kwargs)[0]
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] == graphs  # same shapes: no new graph

    revised = [block_diffusion_generate(model, batch, compile=c, revise=True, **kwargs)[0] for c in (False, True)]
    assert torch.equal(*revised)

    eos = model.config.eos_token_id
    assert torch.equal(ar_generate(model, batch, 24, eos_token_id=eos)[0],
                       ar_generate(model, batch, 24, eos_token_id=eos, compile=True)[0])
    assert not counters["graph_break"], dict(counters["graph_break"])
    static.reset_compiled(model)

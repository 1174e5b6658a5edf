"""Continuous batching at block granularity: requests join at block boundaries, leave when done, and get
exactly the tokens ``generate`` gives them alone (the toy checkpoint answers confidently)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import TOY_PAIRS, toy_picture

from nemo_automodel_bard.models.bard_vl.generation_bard_vl import resolve_generate_options
from nemo_automodel_bard.serving.batching import ContinuousBatcher, QueueFull, Request, RequestTooLarge
from nemo_automodel_bard.serving.prompt import encode_messages


def _inputs(processor, i: int, with_image: bool = True):
    prompt, _, pic = TOY_PAIRS[i]
    content = [{"type": "image", "image": toy_picture(*pic)}] if (pic and with_image) else []
    content.append({"type": "text", "text": prompt})
    return encode_messages(processor, [{"role": "user", "content": content}])


def _alone(model, inputs, **options):
    """``generate`` alone (batch 1)."""
    ids, stats = model.generate(inputs, return_step_stats=True, **options)
    return ids[0].tolist(), stats


def _request(model, inputs, **options) -> Request:
    return Request(inputs=inputs, options=resolve_generate_options(model, **options))


def test_batched_requests_equal_requests_alone_with_staggered_joins(loaded):
    model, processor = loaded
    cases = [(0, dict(max_new_tokens=40)), (2, dict(max_new_tokens=40)), (1, dict(max_new_tokens=40)),
             (2, dict(max_new_tokens=6)), (0, dict(max_new_tokens=10))]  # the last two stop inside a block
    common = dict(block_size=4, denoising_steps=4, confidence_threshold=0.9)
    alone = [_alone(model, _inputs(processor, i), **common, **opts) for i, opts in cases]
    assert alone[0][0][-1] == processor.tokenizer.eos_token_id  # the toy model stops by itself
    assert len(alone[3][0]) == 6 and len(alone[4][0]) == 10

    batcher = ContinuousBatcher(model, max_batch=8)
    try:
        first_block = threading.Event()
        requests = [_request(model, _inputs(processor, i), **common, **opts) for i, opts in cases]
        requests[0].on_block = lambda ids, finished: first_block.set()
        batcher.submit(requests[0])
        assert first_block.wait(60)  # the others join a batch that is already decoding
        for request in requests[1:]:
            batcher.submit(request)
        for request, (ids, stats) in zip(requests, alone):
            assert request.wait(120) == ids
            assert request.stats["block_step_counts"] == stats["block_step_counts"]
            assert request.stats["forwards"] == stats["forwards_total"]  # its own forwards: what it costs alone
            assert request.stats["num_response_tokens"] == stats["num_response_tokens"]
        assert max(r.stats["mean_batch_size"] for r in requests) > 1  # they really shared batches
        assert requests[0].stats["block_step_counts"][0] > 0
        assert batcher.running == 0 and not batcher.cohorts  # everyone left, the cache is gone
    finally:
        batcher.shutdown()


def test_different_options_decode_side_by_side(loaded):
    model, processor = loaded
    settings = [dict(block_size=4, denoising_steps=4, confidence_threshold=0.9),
                dict(block_size=8, denoising_steps=8, remasking_strategy="low_confidence_static"),
                dict(block_size=2, denoising_steps=2, confidence_threshold=0.5),
                dict(block_size=4, denoising_steps=4, remasking_strategy="low_confidence_budget", confidence_threshold=0.8)]
    batcher = ContinuousBatcher(model)
    try:
        jobs = []
        for i, opts in enumerate(settings * 2):
            inputs = _inputs(processor, i % 3)
            jobs.append((_request(model, inputs, max_new_tokens=32, **opts), _alone(model, inputs, max_new_tokens=32, **opts)))
        for request, _ in jobs:
            batcher.submit(request)
        for request, (ids, _) in jobs:
            assert request.wait(120) == ids
    finally:
        batcher.shutdown()


def test_cancel_queue_bound_and_bad_input(loaded):
    model, processor = loaded
    batcher = ContinuousBatcher(model, max_queue=0)
    try:
        with pytest.raises(QueueFull, match="retry later"):
            batcher.submit(_request(model, _inputs(processor, 2), max_new_tokens=8))
    finally:
        batcher.shutdown()

    batcher = ContinuousBatcher(model)
    try:
        keep = _request(model, _inputs(processor, 1), max_new_tokens=40, block_size=4)
        stop = _request(model, _inputs(processor, 0), max_new_tokens=40, block_size=4)
        stop.on_block = lambda ids, finished: stop.cancel()
        bad = _request(model, {"input_ids": torch.tensor([[10**6]])}, max_new_tokens=8, block_size=4)
        for request in (keep, stop, bad):
            batcher.submit(request)
        assert keep.wait(120) == _alone(model, _inputs(processor, 1), max_new_tokens=40, block_size=4)[0]
        stop.wait(120)
        assert stop.stats["cancelled"] and stop.stats["num_blocks"] == 1 and len(stop.tokens) == 4
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            bad.wait(120)
        assert batcher.thread.is_alive()
    finally:
        batcher.shutdown()


@pytest.mark.parametrize("variant", [dict(revise=True), dict(eos_exit=False), dict(fused_commit=False),
                                     dict(fused_prefill=False)])
def test_every_engine_rule_is_served_identically(loaded, variant):
    """Revision, no end-of-answer exit, separate commit and separate prefill: the batcher drives the engine's
    block run, so each gives ``generate``'s tokens, step counts and forwards, also for a request joining mid-flight."""
    model, processor = loaded
    common = dict(block_size=4, denoising_steps=4, confidence_threshold=0.9, max_new_tokens=24, **variant)
    cases = [0, 1, 2]
    alone = [_alone(model, _inputs(processor, i), **common) for i in cases]
    batcher = ContinuousBatcher(model)
    try:
        requests = [_request(model, _inputs(processor, i), **common) for i in cases]
        started = threading.Event()
        requests[0].on_block = lambda ids, finished: started.set()
        batcher.submit(requests[0])
        assert started.wait(60)
        for request in requests[1:]:
            batcher.submit(request)
        for request, (ids, stats) in zip(requests, alone):
            assert request.wait(120) == ids
            assert request.stats["block_step_counts"] == stats["block_step_counts"]
            assert request.stats["forwards"] == stats["forwards_per_sample"][0]
    finally:
        batcher.shutdown()


def test_global_bound_over_cohorts(loaded):
    """200 requests with 200 distinct thresholds (200 cohorts) never have more than ``max_batch`` running at once,
    all of them are answered, and a request that could never fit the KV bound is refused when submitted."""
    model, processor = loaded
    inputs = _inputs(processor, 2, with_image=False)
    batcher = ContinuousBatcher(model, max_batch=4, max_queue=200)
    try:
        requests = [_request(model, inputs, max_new_tokens=4, block_size=4, confidence_threshold=0.5 + i / 1000)
                    for i in range(200)]
        for request in requests:
            batcher.submit(request)
        expected = _alone(model, inputs, max_new_tokens=4, block_size=4, confidence_threshold=0.5)[0]
        assert all(request.wait(300) == expected for request in requests)
        assert 1 < batcher.peak_running <= 4
    finally:
        batcher.shutdown()
    batcher = ContinuousBatcher(model, max_positions=inputs["input_ids"].shape[1] + 8)
    try:
        with pytest.raises(RequestTooLarge, match="more than the server's bound"):
            batcher.submit(_request(model, inputs, max_new_tokens=9, block_size=4))  # 3 blocks: 12 positions
        fits = [_request(model, inputs, max_new_tokens=8, block_size=4) for _ in range(3)]
        for request in fits:
            batcher.submit(request)
        assert all(request.wait(120) for request in fits)
        assert batcher.peak_running == 1  # the KV bound lets one run at a time
    finally:
        batcher.shutdown()


def test_a_long_block_does_not_starve_a_small_request(loaded):
    """Cohorts take turns per denoising forward: a small request that joins while a 64-position static block (64
    forwards) is decoding finishes long before it, with its own tokens."""
    model, processor = loaded
    batcher = ContinuousBatcher(model)
    try:
        big = _request(model, _inputs(processor, 0), max_new_tokens=64, block_size=64, denoising_steps=64,
                       remasking_strategy="low_confidence_static", eos_exit=False)
        small = _request(model, _inputs(processor, 2), max_new_tokens=8, block_size=4)
        batcher.submit(big)
        while batcher.forwards_run < 3:  # the big block is running
            time.sleep(0.005)
        batcher.submit(small)
        assert small.wait(120) == _alone(model, _inputs(processor, 2), max_new_tokens=8, block_size=4)[0]
        assert not big.done.is_set()  # the big block is still going
        big.wait(300)
        assert big.stats["block_step_counts"] == [64]
        assert small.stats["decode_s"] < big.stats["decode_s"] / 4
    finally:
        batcher.shutdown()

"""Plain autoregressive decoding with a KV cache (the network run causally): the cost floor baseline."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import one_thread  # noqa: F401 - fixture
import torch
from PIL import Image

from nemo_automodel_bard.decoding import ar_generate


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _chat(processor, content) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _picture(width: int, height: int) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 3] = (230, 40, 40)
    array[height // 2 :, width // 3 :] = (40, 40, 230)
    return Image.fromarray(array)


def _count(model) -> list:
    calls = []
    original = model.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        out = original(*args, **kwargs)
        return out

    model.forward = counted
    return calls


def test_kv_cache_decoding_equals_recomputing_the_causal_forward(tiny_model, tiny_processor):
    batch = dict(tiny_processor(text=[_chat(tiny_processor, "Tell me a story.")], return_tensors="pt"))
    calls = _count(tiny_model)
    ids, stats = ar_generate(tiny_model, batch, max_new_tokens=10, eos_token_id=None)
    assert ids.shape == (1, 10)
    assert stats["forwards_total"] == len(calls) == 10 == stats["prefill_forwards"] + stats["decode_forwards"]
    assert calls[0][1] == batch["input_ids"].shape[1] and all(shape == (1, 1) for shape in calls[1:])
    assert stats["num_response_tokens"] == 10 and stats["tokens_per_forward"] == 1.0
    assert stats["forwards_per_sample"] == [stats["forwards_total"]] * len(stats["forwards_per_sample"])
    tiny_model.__dict__.pop("forward")

    # naive: no cache, the whole sequence through a causal mask each time, prediction shifted by one
    sequence = batch["input_ids"]
    with torch.no_grad():
        for _ in range(10):
            n = sequence.shape[1]
            causal = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
            positions = torch.arange(n).view(1, 1, n).expand(3, 1, n)
            logits = tiny_model(input_ids=sequence, attention_mask=causal[None, None], position_ids=positions).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, sequence[:, -10:])


def test_batch_is_left_padded_and_independent(tiny_model, tiny_processor):
    contents = [
        [{"type": "image"}, {"type": "text", "text": "Describe."}],
        "Count the shapes in the picture, please.",
        [{"type": "image"}, {"type": "text", "text": "What is at the top left of this image?"}],
    ]
    images = [_picture(64, 64), _picture(128, 96)]
    texts = [_chat(tiny_processor, c) for c in contents]
    batch = dict(tiny_processor(text=texts, images=images, padding=True, return_tensors="pt"))
    assert not bool(batch["attention_mask"].all())
    out, stats = ar_generate(tiny_model, batch, max_new_tokens=8)
    image_iter = iter(images)
    for i, (text, content) in enumerate(zip(texts, contents)):
        kwargs = {"images": [next(image_iter)]} if isinstance(content, list) else {}
        single = dict(tiny_processor(text=[text], return_tensors="pt", **kwargs))
        alone, _ = ar_generate(tiny_model, single, max_new_tokens=8)
        assert torch.equal(out[i], alone[0]), i
    assert stats["forwards_total"] == 8 and stats["num_response_tokens"] == 24


def test_eos_stops_each_sample_and_is_counted(tiny_model, tiny_processor):
    eos = tiny_model.config.eos_token_id
    texts = [_chat(tiny_processor, "Hello there."), _chat(tiny_processor, "Count.")]
    batch = dict(tiny_processor(text=texts, padding=True, return_tensors="pt"))
    calls = []
    original = tiny_model.forward

    def force_eos(*args, **kwargs):  # sample 0 emits EOS as its 4th token; sample 1 at its 6th
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out.logits[0, eos] += 1e4
        if len(calls) == 6:
            out.logits[1, eos] += 1e4
        return out

    tiny_model.forward = force_eos
    ids, stats = ar_generate(tiny_model, batch, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert ids.shape == (2, 6)
    assert ids[0, 3].item() == eos and ids[0, 4:].tolist() == [0, 0]
    assert ids[1, 5].item() == eos
    assert stats["response_tokens_per_sample"] == [4, 6] and stats["num_response_tokens"] == 10
    assert stats["forwards_total"] == len(calls) == 6
    assert stats["forwards_per_sample"] == [4, 6]  # sample 0 needed 4 forwards (prefill + 3), not the batch's 6


def test_bad_arguments(tiny_model, tiny_processor):
    batch = dict(tiny_processor(text=[_chat(tiny_processor, "Hi.")], return_tensors="pt"))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        ar_generate(tiny_model, batch, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-padding token"):
        ar_generate(tiny_model, {**batch, "attention_mask": torch.zeros_like(batch["input_ids"])}, max_new_tokens=2)

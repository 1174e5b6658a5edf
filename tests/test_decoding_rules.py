"""Unmasking rules, sampling, revision and argument checking of the block-diffusion decoder.

Random tiny weights are enough here: the checks are about mechanics (what is committed when,
what is reproducible, what is refused); forward hooks create the situations to test.
"""

from __future__ import annotations

import pytest
from helpers import boost_logits, one_thread  # noqa: F401 - fixture
import torch

from nemo_automodel_bard.decoding import (
    RULES,
    UnmaskingRule,
    filter_logits,
    propose_tokens,
    select_commits,
    transfer_schedule,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture()
def prompt(tiny_processor):
    text = tiny_processor.apply_chat_template(
        [{"role": "user", "content": "Describe the picture in detail."}], tokenize=False, add_generation_prompt=True
    )
    return dict(tiny_processor(text=[text], return_tensors="pt"))


_boost = boost_logits


# ------------------------------------------------------------------------------------------ helpers' math
def test_transfer_schedule_is_an_even_split():
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert transfer_schedule(4, 2) == [2, 2]
    assert transfer_schedule(4, 8) == [1, 1, 1, 1]  # more steps than tokens: clamped
    assert transfer_schedule(32, 1) == [32]
    for block in (2, 5, 16, 32):
        for steps in (1, 3, 7, 64):
            assert sum(transfer_schedule(block, steps)) == block


def test_select_commits_static_dynamic_and_ties():
    score = torch.tensor([[0.2, 0.9, 0.9, 0.95], [0.5, 0.5, 0.5, 0.5]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    static = select_commits(score, masked, 2, dynamic=False, threshold=0.0)
    assert static.tolist() == [[False, True, True, False], [True, True, False, False]]  # ties: leftmost first
    dynamic = select_commits(score, masked, 1, dynamic=True, threshold=0.8)
    assert dynamic.tolist() == [[False, True, True, False], [True, False, False, False]]
    never = select_commits(score, masked, 1, dynamic=True, threshold=1.0)
    assert torch.equal(never, select_commits(score, masked, 1, dynamic=False, threshold=0.0))
    assert not bool(select_commits(score, torch.zeros_like(masked), 3, dynamic=True, threshold=0.0).any())


def test_propose_tokens_scores_and_suppression():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 50, generator=g) * 3
    logits[0, 0, 7] = 100.0  # the suppressed id would win
    for score in ("low_confidence", "margin", "entropy", "random"):
        tokens, value, prob = propose_tokens(logits, score=score, suppress_token_id=7, generator=g)
        assert tokens.shape == value.shape == prob.shape == (2, 4)
        assert not bool((tokens == 7).any())
        assert bool(((value >= 0) & (value <= 1)).all()) and bool(((prob > 0) & (prob <= 1)).all())
    tokens, value, prob = propose_tokens(logits.double())
    assert tokens[0, 0] == 7 and value.dtype == torch.float32
    torch.testing.assert_close(prob, logits.float().softmax(-1).max(-1).values)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not bool(torch.isinf(filter_logits(logits, top_k=0, top_p=1.0)).any())


def test_rule_names_parse():
    assert UnmaskingRule.parse("low_confidence_static") == UnmaskingRule("low_confidence", False)
    assert UnmaskingRule.parse("margin") == UnmaskingRule("margin", True)
    assert UnmaskingRule.parse("random") == UnmaskingRule("random", False)
    with pytest.raises(ValueError, match="unknown remasking_strategy 'fastest'.*low_confidence_static"):
        UnmaskingRule.parse("fastest")


# ------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"block_size": -4}, "block_size must be a positive integer"),
        ({"block_size": 2.5}, "block_size must be a positive integer"),
        ({"denoising_steps": 0}, "denoising_steps must be a positive integer"),
        ({"denoising_steps": -1}, "denoising_steps must be a positive integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"remasking_strategy": "fastest"}, "unknown remasking_strategy 'fastest'"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"temperature": -0.5}, "temperature must be"),
        ({"confidence_threshold": float("nan")}, r"confidence_threshold must be in \[0, 1\]"),
        ({"mask_token_id": 10**6}, "mask_token_id=1000000 is outside the vocabulary"),
        ({"mask_token_id": -1}, "mask_token_id=-1 is outside the vocabulary"),
        ({"max_revision_steps": -1, "revise": True}, "max_revision_steps must be an integer >= 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny_model, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(prompt, **{"max_new_tokens": 8, **kwargs})


def test_missing_or_invalid_mask_id_in_the_config(tiny_model, prompt):
    vocab = tiny_model.config.text_config.vocab_size
    tiny_model.config.mask_token_id = None
    tiny_model.generation_config.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token id: set config.mask_token_id"):
        tiny_model.generate(prompt, max_new_tokens=8)
    tiny_model.config.mask_token_id = vocab + 3
    with pytest.raises(ValueError, match=f"mask_token_id={vocab + 3} is outside the vocabulary"):
        tiny_model.generate(prompt, max_new_tokens=8)


def test_bad_inputs_raise(tiny_model, prompt):
    with pytest.raises(TypeError, match="unexpected inputs"):
        tiny_model.generate(prompt, max_new_tokens=8, labels=prompt["input_ids"])
    with pytest.raises(ValueError, match="non-padding token"):
        tiny_model.generate({"input_ids": prompt["input_ids"], "attention_mask": torch.zeros_like(prompt["input_ids"])},
                            max_new_tokens=8)
    with pytest.raises(ValueError, match="needs input_ids"):
        tiny_model.generate({}, max_new_tokens=8)


# ------------------------------------------------------------------------------------------ rules run
@pytest.mark.parametrize("rule", list(RULES) + ["margin", "entropy"])
def test_every_rule_commits_every_position(tiny_model, prompt, rule):
    mask_id = tiny_model.config.mask_token_id
    g = torch.Generator().manual_seed(0)
    for block, steps in ((4, 4), (8, 3)):
        ids, stats = tiny_model.generate(
            prompt, max_new_tokens=16, block_size=block, denoising_steps=steps, remasking_strategy=rule,
            confidence_threshold=0.05, return_step_stats=True, record_trajectory=True, generator=g,
        )
        assert not bool((ids == mask_id).any())
        expected = min(block, steps)
        for entry, count in zip(stats["trajectory"], stats["block_step_counts"]):
            assert bool((entry["committed_at"] >= 0).all()), "every position of a decoded block was committed"
            assert not bool((entry["tokens"] == mask_id).any())
            if rule.endswith("static") or rule == "random":
                assert count == expected
            else:
                assert 1 <= count <= expected
        assert stats["forwards_total"] == sum(stats["block_step_counts"])  # fused prefill: block 0's first step


def test_dynamic_rules_commit_above_threshold_in_one_step(tiny_model, prompt):
    """A threshold of 0 (below every score) commits the whole block in the first step."""
    for rule in ("low_confidence_dynamic", "margin_dynamic", "entropy_dynamic"):
        _, stats = tiny_model.generate(prompt, max_new_tokens=16, block_size=8, denoising_steps=8,
                                       remasking_strategy=rule, confidence_threshold=0.0, return_step_stats=True)
        assert stats["block_step_counts"] == [1, 1]


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_is_reproducible_with_a_seeded_generator(tiny_model, prompt):
    kwargs = dict(max_new_tokens=24, block_size=4, denoising_steps=4, temperature=0.8, top_k=40, top_p=0.9,
                  remasking_strategy="low_confidence_dynamic", confidence_threshold=0.5)
    first = tiny_model.generate(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    again = tiny_model.generate(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    other = tiny_model.generate(prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    greedy = tiny_model.generate(prompt, **{**kwargs, "temperature": 0.0})
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, greedy)
    random_rule = dict(kwargs, temperature=0.0, remasking_strategy="random")
    a = tiny_model.generate(prompt, generator=torch.Generator().manual_seed(3), **random_rule)
    b = tiny_model.generate(prompt, generator=torch.Generator().manual_seed(3), **random_rule)
    assert torch.equal(a, b)


def test_top_k_one_sampling_is_greedy(tiny_model, prompt):
    kwargs = dict(max_new_tokens=16, block_size=4, denoising_steps=4, remasking_strategy="low_confidence_static")
    greedy = tiny_model.generate(prompt, **kwargs)
    sampled = tiny_model.generate(prompt, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(greedy, sampled)


def test_generation_config_sampling_settings_apply_only_with_do_sample(tiny_model, prompt):
    kwargs = dict(max_new_tokens=16, block_size=4, denoising_steps=4)
    greedy = tiny_model.generate(prompt, **kwargs)
    tiny_model.generation_config.temperature = 5.0  # ignored: do_sample is False
    assert torch.equal(tiny_model.generate(prompt, **kwargs), greedy)
    tiny_model.generation_config.do_sample = True
    sampled = tiny_model.generate(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    assert not torch.equal(sampled, greedy)


# ------------------------------------------------------------------------------------------ revision
def _start(model, inputs) -> int:
    return int(model.position_ids_for(inputs["input_ids"]).max()) + 1


def test_revision_replaces_a_token_the_model_turns_against(tiny_model, prompt):
    start = _start(tiny_model, prompt)
    X, Y = 100, 101
    kwargs = dict(max_new_tokens=8, block_size=4, denoising_steps=4, remasking_strategy="low_confidence_static",
                  return_step_stats=True, record_trajectory=True)
    baseline, base_stats = tiny_model.generate(prompt, **kwargs)
    off, _ = tiny_model.generate(prompt, revise=False, **kwargs)
    assert torch.equal(baseline, off), "revision off (the default) changes nothing"
    unconfident, _ = tiny_model.generate(prompt, revise=True, **kwargs)
    assert torch.equal(baseline, unconfident), "a random model is never sure enough to revise"

    # position 0: X is proposed confidently while masked; once X is committed the model wants Y
    def flip_once(b, pos, tok):
        if pos != start:
            return None
        if tok == tiny_model.config.mask_token_id:
            return (X, 40.0)
        return (Y, 40.0) if tok == X else None

    _boost(tiny_model, flip_once)
    kept, kept_stats = tiny_model.generate(prompt, **kwargs)
    revised, stats = tiny_model.generate(prompt, revise=True, revision_threshold=0.9, **kwargs)
    assert kept[0, 0].item() == X and kept_stats["trajectory"][0]["committed_at"][0, 0].item() == 0
    assert revised[0, 0].item() == Y
    assert stats["trajectory"][0]["committed_at"][0, 0].item() == 1  # revised at the step after its commit
    assert stats["block_step_counts"] == kept_stats["block_step_counts"] == [4, 4]
    assert stats["revision_forwards"] == 0  # revised during ordinary steps: no extra forward
    assert stats["forwards_total"] == kept_stats["forwards_total"]


@pytest.mark.parametrize("max_revision_steps", [0, 1, 3])
def test_revision_is_bounded(tiny_model, prompt, max_revision_steps):
    start = _start(tiny_model, prompt)
    X, Y = 100, 101

    def flip_forever(b, pos, tok):  # the model never settles on position 0
        if pos != start:
            return None
        return (Y, 40.0) if tok == X else (X, 40.0)

    _boost(tiny_model, flip_forever)
    _, stats = tiny_model.generate(prompt, max_new_tokens=8, block_size=4, denoising_steps=4,
                                   remasking_strategy="low_confidence_static", return_step_stats=True,
                                   revise=True, max_revision_steps=max_revision_steps)
    assert stats["block_step_counts"] == [4 + max_revision_steps, 4]
    assert stats["revision_forwards"] == max_revision_steps
    assert stats["forwards_total"] == 8 + max_revision_steps  # the fused prefill is block 0's first step


def test_revision_keeps_batch_samples_independent(tiny_model, tiny_processor):
    texts = [
        tiny_processor.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ("Describe the picture in detail.", "Count.")
    ]
    batch = dict(tiny_processor(text=texts, padding=True, return_tensors="pt"))
    singles = [dict(tiny_processor(text=[t], return_tensors="pt")) for t in texts]
    start0 = _start(tiny_model, singles[0])
    X, Y = 100, 101

    def flip_sample0(b, pos, tok):
        if b != 0 or pos != start0:
            return None
        return (Y, 40.0) if tok == X else (X, 40.0)

    kwargs = dict(max_new_tokens=8, block_size=4, denoising_steps=4, remasking_strategy="low_confidence_static",
                  return_step_stats=True, revise=True, max_revision_steps=2)
    _boost(tiny_model, flip_sample0)
    out, stats = tiny_model.generate(batch, **kwargs)
    assert stats["block_step_counts"] == [[6, 4], [4, 4]]
    alone0, _ = tiny_model.generate(singles[0], **kwargs)
    tiny_model.__dict__.pop("forward")
    alone1, _ = tiny_model.generate(singles[1], **kwargs)
    assert torch.equal(out[0, : alone0.shape[1]], alone0[0])
    assert torch.equal(out[1, : alone1.shape[1]], alone1[0])


def test_budget_rule_bounds_the_summed_doubt_of_a_step():
    """``*_budget`` commits the best positions while sum(1 - score) <= 1 - threshold (and at least k)."""
    score = torch.tensor([[0.95, 0.95, 0.95, 0.2], [0.99, 0.97, 0.5, 0.999], [0.3, 0.2, 0.1, 0.05]])
    masked = torch.tensor([[True, True, True, True], [True, True, True, False], [True, True, True, True]])
    commit = select_commits(score, masked, 1, dynamic=True, threshold=0.9, budget=True)
    # row 0: 0.05 + 0.05 = 0.10 fits, a third 0.95 would not (the threshold rule commits all three)
    # row 1: the decided 0.999 never counts; 0.01 + 0.03 fit; row 2: only the forced best one
    assert commit.tolist() == [[True, True, False, False], [True, True, False, False], [True, False, False, False]]
    per_position = select_commits(score, masked, 1, dynamic=True, threshold=0.9)
    assert per_position[0].tolist() == [True, True, True, False]
    static = select_commits(score, masked, 1, dynamic=False, threshold=0.0)
    assert torch.equal(select_commits(score, masked, 1, dynamic=True, threshold=1.0, budget=True), static)
    assert UnmaskingRule.parse("low_confidence_budget") == UnmaskingRule("low_confidence", True, budget=True)


def test_budget_rule_is_batch_invariant_and_counts_every_forward(tiny_model, prompt):
    """Each sample of a batch decodes exactly as alone, and the statistics count each forward it took part in."""
    batch = {k: torch.cat([v, v]) for k, v in prompt.items()}
    kwargs = dict(max_new_tokens=16, block_size=8, denoising_steps=8, remasking_strategy="low_confidence_budget",
                  confidence_threshold=0.5, return_step_stats=True)
    alone, alone_stats = tiny_model.generate(prompt, **kwargs)
    both, stats = tiny_model.generate(batch, **kwargs)
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[0])
    assert stats["forwards_per_sample"] == [alone_stats["forwards_total"]] * 2
    assert alone_stats["forwards_total"] == sum(alone_stats["block_step_counts"])

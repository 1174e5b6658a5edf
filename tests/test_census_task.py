"""The census task: deterministic samples, disjoint splits, answer lengths, and a scorer that accepts every valid
form of an answer and nothing else."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from nemo_automodel_bard.data.shapes import approx_word_tokens
from nemo_automodel_bard.data.census import (
    CENSUS_SPLITS,
    CensusChatDataset,
    CensusTask,
    census_dataset,
    exact_match,
    field_score,
    format_census,
    layout_split,
    parse_census,
    score,
)


def test_samples_are_pure_functions_of_seed_split_index():
    a, b = CensusTask(seed=3).sample("validation", 5), CensusTask(seed=3).sample("validation", 5)
    assert a.answer == b.answer and a.prompt == b.prompt and a.image.tobytes() == b.image.tobytes()
    assert CensusTask(seed=4).sample("validation", 5).answer != a.answer
    assert a.image.size == (128, 128)


def test_splits_are_disjoint_by_construction():
    task = CensusTask(seed=0)
    seen: dict[str, set] = {split: set() for split in CENSUS_SPLITS}
    for split in CENSUS_SPLITS:
        for i in range(300):
            layout = tuple(task.layout(split, i))
            assert layout_split(layout) == split
            seen[split].add(layout)
    assert not (seen["train"] & seen["validation"]) and not (seen["train"] & seen["test"])
    assert not (seen["validation"] & seen["test"])


def test_answers_are_long_and_consistent_with_the_image():
    task = CensusTask(seed=0)
    lengths = []
    for i in range(200):
        s = task.sample("train", i)
        parsed = parse_census(s.answer)
        assert list(parsed.objects) == s.objects  # reading order
        assert dict(parsed.colors) == dict(Counter(o[0] for o in s.objects))
        assert dict(parsed.shapes) == dict(Counter(o[1] for o in s.objects))
        assert parsed.total == len(s.objects)
        lengths.append(approx_word_tokens(s.answer))
    assert min(lengths) >= 64 and max(lengths) <= 192 and sum(lengths) / len(lengths) >= 96


def test_the_reference_draws_many_orders_of_the_counts():
    orders = {tuple(c for c, _ in parse_census(CensusTask(seed=0).sample("train", i).answer).colors)
              for i in range(200)}
    assert len(orders) > 100


def test_every_order_of_the_counts_is_right_and_nothing_else():
    objs = [("red", "circle", 1, 1), ("blue", "cross", 2, 3), ("red", "square", 3, 3), ("green", "cross", 4, 4)]
    ref = format_census(objs, ["red", "blue", "green"], ["circle", "cross", "square"])
    for colors in itertools.permutations(["red", "blue", "green"]):
        for shapes in itertools.permutations(["circle", "cross", "square"]):
            assert exact_match(format_census(objs, list(colors), list(shapes)), ref)
    wrong = [
        ref.replace("total 4", "total 5"),
        ref.replace("red 2", "red 3"),
        ref.replace("red 2, blue 1", "red 2, red 2"),  # a colour twice, another missing (mixed orders)
        ref.replace("blue 1, ", ""),
        ref.replace("red circle 1 1, blue cross 2 3", "blue cross 2 3, red circle 1 1"),  # the listing's order
        ref.replace(". circle", ", circle"),
        ref.split(" total")[0],
    ]
    for pred in wrong:
        assert not exact_match(pred, ref), pred
    assert exact_match(ref.upper().replace(", ", " ,  "), ref)  # case and spacing


def test_field_score_counts_each_field():
    ref = "red circle 1 1, blue cross 2 3. red 1, blue 1. circle 1, cross 1. total 2."
    assert field_score(ref, ref) == 1.0
    assert field_score("garbage", ref) == 0.0
    assert field_score("red circle 1 1, blue cross 2 3. red 1, blue 1. circle 1, cross 1. total 3.", ref) == 6 / 7
    assert field_score("red circle 1 1, blue cross 2 3, red cross 4 4. red 1, blue 1. circle 1, cross 1. total 2.",
                       ref) == 7 / 8
    with pytest.raises(ValueError, match="unparsable reference"):
        field_score(ref, "not an answer")
    assert score([ref, "x"], [ref, ref]) == {"exact_match": 0.5, "field_accuracy": 0.5, "parsed": 0.5, "n": 2}


def test_chat_dataset_offsets_and_errors():
    ds = census_dataset(split="train", size=3, seed=0, offset=10)
    assert isinstance(ds, CensusChatDataset) and len(ds) == 3
    record = ds[2]
    assert record["index"] == 12
    assert record["messages"][1]["content"][0]["text"] == CensusTask(seed=0).text("train", 12)[1]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="split must be one of"):
        census_dataset(split="heldout")
    with pytest.raises(ValueError, match="offset"):
        census_dataset(offset=-1)


def test_random_predictions_never_match():
    task = CensusTask(seed=1)
    rng = random.Random(0)
    refs = [task.sample("test", i).answer for i in range(20)]
    for ref in refs:
        words = ref.split()
        rng.shuffle(words)
        assert not exact_match(" ".join(words), ref)

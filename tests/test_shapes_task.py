"""Tests of the embedded synthetic shapes task (nemo_automodel_bard.data.shapes)."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from PIL import Image

from nemo_automodel_bard.data import shapes
from nemo_automodel_bard.data.shapes import (
    BACKGROUND_RGB,
    COLOR_RGB,
    COLORS,
    PROMPTS,
    SHAPES,
    SPLITS,
    TASK_VOCABULARY,
    VIDEO_PROMPT,
    ShapesDataset,
    ShapesTask,
    approx_word_tokens,
    exact_match,
    field_accuracy,
    format_answer,
    layout_split,
    parse_answer,
    render_examples,
    score,
    task_corpus,
    video_to_messages,
    write_jsonl,
)


@pytest.fixture(scope="module")
def task() -> ShapesTask:
    return ShapesTask(seed=0)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_doctests():
    result = doctest.testmod(shapes, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10
    assert result.failed == 0


def test_determinism(task):
    other_instance = ShapesTask(seed=0)
    for split in SPLITS:
        for i in (0, 1, 17, 123):
            a, b = task.sample(split, i), other_instance.sample(split, i)
            assert a.image.mode == "RGB" and a.image.size == (96, 96)
            assert np.array_equal(_pixels(a.image), _pixels(b.image))
            assert (a.prompt, a.answer, a.objects) == (b.prompt, b.answer, b.objects)
            assert (a.index, a.split) == (i, split)
    # another seed gives other samples
    seed1 = ShapesTask(seed=1)
    assert [task.text("train", i) for i in range(10)] != [seed1.text("train", i) for i in range(10)]
    assert not np.array_equal(_pixels(task.sample("train", 0).image), _pixels(seed1.sample("train", 0).image))
    # consecutive indices differ too
    assert len({task.text("train", i)[1] for i in range(50)}) == 50


def test_train_heldout_disjoint(task):
    n = 3000
    train = {tuple(task.layout("train", i)) for i in range(n)}
    held = {tuple(task.layout("heldout", i)) for i in range(n)}
    assert len(held) > n * 0.99  # essentially all distinct
    assert train.isdisjoint(held)
    # guaranteed by construction: the layout hash decides the split, for any seed
    assert all(layout_split(layout) == "heldout" for layout in list(held)[:200])
    assert all(layout_split(layout) == "train" for layout in list(train)[:200])
    other = ShapesTask(seed=5)
    assert {tuple(other.layout("heldout", i)) for i in range(300)}.isdisjoint(train)


def test_answer_lengths_and_format(task):
    lengths = []
    for split in SPLITS:
        for i in range(500):
            prompt, answer = task.text(split, i)
            objects = task.layout(split, i)
            assert prompt in PROMPTS
            assert 4 <= len(objects) <= 9
            assert [(r, c) for _, _, r, c in objects] == sorted((r, c) for _, _, r, c in objects)
            assert len({(r, c) for _, _, r, c in objects}) == len(objects)
            assert answer == format_answer(objects)
            assert answer.endswith(".")
            assert parse_answer(answer) == objects
            n_tok = approx_word_tokens(answer)
            assert 20 <= n_tok <= 60, answer
            assert n_tok == 5 * len(objects)
            lengths.append(n_tok)
    assert min(lengths) == 20 and max(lengths) == 45
    assert 28 <= float(np.mean(lengths)) <= 37


def test_objects_visible_in_their_cells(task):
    bg = np.array(BACKGROUND_RGB)
    for split in SPLITS:
        for i in range(60):
            s = task.sample(split, i)
            a = _pixels(s.image)
            occupied = {(r, c): color for color, _, r, c in s.objects}
            for r in range(1, 4):
                for c in range(1, 4):
                    cell = a[(r - 1) * 32 : r * 32, (c - 1) * 32 : c * 32]
                    centre = cell[14:18, 14:18].reshape(-1, 3)
                    border = np.concatenate([cell[:2, :].reshape(-1, 3), cell[-2:, :].reshape(-1, 3),
                                             cell[:, :2].reshape(-1, 3), cell[:, -2:].reshape(-1, 3)])
                    assert (border == bg).all(), (split, i, r, c)  # shapes stay inside their cell
                    if (r, c) in occupied:
                        colour = np.array(COLOR_RGB[occupied[(r, c)]])
                        assert (centre == colour).all(), (split, i, r, c)
                        filled = (cell == colour).all(-1).mean()
                        assert 0.2 < filled < 0.75, (split, i, r, c, filled)
                        assert ((cell == colour).all(-1) | (cell == bg).all(-1)).all()
                    else:
                        assert (cell == bg).all(), (split, i, r, c)


def test_shapes_are_distinguishable(task):
    # the four shapes fill clearly different fractions/profiles of their box: check mean fill per shape
    fills: dict[str, list[float]] = {s: [] for s in SHAPES}
    for i in range(80):
        s = task.sample("train", i)
        a = _pixels(s.image)
        for o in s.drawn:
            cell = a[(o.row - 1) * 32 : o.row * 32, (o.col - 1) * 32 : o.col * 32]
            mask = (cell == np.array(COLOR_RGB[o.color])).all(-1)
            top_half = mask[:16].sum() / max(1, mask.sum())
            fills[o.shape].append((mask.sum() / o.size**2, top_half))
    means = {k: np.mean(v, axis=0) for k, v in fills.items()}
    assert means["triangle"][1] < 0.4  # triangles are heavier at the bottom
    # fill ratios: cross ~0.55, square (inset) ~0.67, circle ~0.78 (pi/4); triangle ~0.5 but bottom-heavy
    assert means["cross"][0] + 0.05 < means["square"][0] < means["circle"][0] - 0.05
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 0.05, (a, b, means)


def test_parse_answer_robust():
    assert parse_answer("red circle 1 2, blue cross 3 3.") == [("red", "circle", 1, 2), ("blue", "cross", 3, 3)]
    assert parse_answer("  RED   circle 1 2 ;blue cross 3 3 ") == [("red", "circle", 1, 2), ("blue", "cross", 3, 3)]
    assert parse_answer("red circle 1 2,\n blue cross 3 3.") == [("red", "circle", 1, 2), ("blue", "cross", 3, 3)]
    for bad in ["", "   .", "red circle 1", "pink circle 1 2.", "red hexagon 1 2.", "red circle 1 2 3.",
                "red circle 1 2, blue", "red circle 0 2."]:
        assert parse_answer(bad) is None, bad
    assert parse_answer(None) is None  # type: ignore[arg-type]


def test_metrics(task):
    refs = [task.text("heldout", i)[1] for i in range(40)]
    full = score(refs, refs)
    assert full == {"exact_match": 1.0, "field_accuracy": 1.0, "parsed": 1.0, "n": 40}
    # formatting noise does not matter
    noisy = [r.upper().replace(", ", " ,  ").rstrip(".") for r in refs]
    assert score(noisy, refs)["exact_match"] == 1.0
    # corrupt one field of every answer: exact match drops to 0, field accuracy drops but stays > 0
    corrupted = []
    for r in refs:
        objs = parse_answer(r)
        c, s, row, col = objs[0]
        objs[0] = (COLORS[(COLORS.index(c) + 1) % len(COLORS)], s, row, col)
        corrupted.append(format_answer(objs))
    sc = score(corrupted, refs)
    assert sc["exact_match"] == 0.0
    assert 0.5 < sc["field_accuracy"] < 1.0
    # half right
    half = refs[:20] + ["garbage"] * 20
    sc = score(half, refs)
    assert sc["exact_match"] == 0.5 and sc["parsed"] == 0.5 and sc["field_accuracy"] == pytest.approx(0.5)
    # extra objects are penalised, reordering is not
    ref = "red circle 1 1, blue square 1 2."
    assert field_accuracy("blue square 1 2, red circle 1 1.", ref) == 1.0
    assert not exact_match("blue square 1 2, red circle 1 1.", ref)
    assert field_accuracy(ref[:-1] + ", green cross 3 3.", ref) == pytest.approx(2 / 3)
    assert field_accuracy("red circle 1 1, junk junk.", ref) == 0.5
    assert field_accuracy("", ref) == 0.0
    assert field_accuracy([("red", "circle", 1, 1)], ref) == 0.5
    for p in ["", "red", ref, ref + ref]:
        assert 0.0 <= field_accuracy(p, ref) <= 1.0
    with pytest.raises(ValueError):
        score(["a"], [])
    assert score([], [])["n"] == 0


def test_messages_and_dataset(task):
    s = task.sample("train", 2)
    m = s.to_messages("x.png")
    assert m == {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": s.prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": s.answer}]},
        ]
    }
    assert s.to_messages()["messages"][0]["content"][0]["image"] is s.image
    ds = ShapesDataset(task, "heldout", 6)
    assert len(ds) == 6
    rec = ds[5]
    ref = task.sample("heldout", 5)
    img = rec["messages"][0]["content"][0]["image"]
    assert isinstance(img, Image.Image) and np.array_equal(_pixels(img), _pixels(ref.image))
    assert rec["messages"][1]["content"][0]["text"] == ref.answer
    assert ds[-1]["messages"][1]["content"][0]["text"] == ref.answer
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError):
        ShapesDataset(task, "test", 3)


def test_write_jsonl(task, tmp_path):
    out = tmp_path / "data"
    path = write_jsonl(task, "train", 5, out)
    assert path == out / "train.jsonl" and path.exists()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert set(rec) == {"messages"}
        user, assistant = rec["messages"]
        ref = user["content"][0]["image"]
        assert isinstance(ref, str) and not ref.startswith("/") and ".." not in ref
        img_path = out / ref
        assert img_path.exists()
        sample = task.sample("train", i)
        assert np.array_equal(_pixels(Image.open(img_path)), _pixels(sample.image))  # PNG is lossless
        assert user["content"][1] == {"type": "text", "text": sample.prompt}
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}
    # relative paths survive moving the directory
    moved = tmp_path / "moved"
    out.rename(moved)
    first = json.loads((moved / "train.jsonl").read_text().splitlines()[0])
    assert (moved / first["messages"][0]["content"][0]["image"]).exists()


def test_video(task):
    frames, prompt, answer = task.sample_video("train", 3, num_frames=4)
    frames2, prompt2, answer2 = ShapesTask(seed=0).sample_video("train", 3, num_frames=4)
    assert len(frames) == 4 and prompt == prompt2 == VIDEO_PROMPT and answer == answer2
    for a, b in zip(frames, frames2):
        assert a.size == (96, 96) and np.array_equal(_pixels(a), _pixels(b))
    objects = parse_answer(answer)
    assert objects is not None and 4 <= len(objects) <= 9
    assert 20 <= approx_word_tokens(answer) <= 60
    # the grid fills up: every frame keeps the pixels of the previous one and adds objects
    bg = (np.asarray(frames[0]) == np.array(BACKGROUND_RGB)).all(-1)
    assert not bg.all()
    prev = _pixels(frames[0])
    for f in frames[1:]:
        cur = _pixels(f)
        drawn = ~(prev == np.array(BACKGROUND_RGB)).all(-1)
        assert np.array_equal(cur[drawn], prev[drawn])
        prev = cur
    last = _pixels(frames[-1])
    for color, _, r, c in objects:
        assert (last[(r - 1) * 32 + 15, (c - 1) * 32 + 15] == np.array(COLOR_RGB[color])).all()
    # different index / split / seed give different videos
    assert task.sample_video("train", 4)[2] != answer or task.sample_video("heldout", 3)[2] != answer
    held = {tuple(parse_answer(task.sample_video("heldout", i, num_frames=1)[2])) for i in range(30)}
    assert all(layout_split(h) == "heldout" for h in held)
    m = video_to_messages(frames, prompt, answer)
    assert m["messages"][0]["content"][0] == {"type": "video", "video": frames}
    assert len(task.sample_video("train", 0, num_frames=1)[0]) == 1
    with pytest.raises(ValueError):
        task.sample_video("train", 0, num_frames=0)


def test_vocabulary_and_corpus():
    assert len(TASK_VOCABULARY) == len(set(TASK_VOCABULARY))
    vocab = set(TASK_VOCABULARY)
    assert set(COLORS) <= vocab and set(SHAPES) <= vocab and {",", ".", "1", "2", "3"} <= vocab
    corpus = task_corpus(300, seed=0)
    assert corpus == task_corpus(300, seed=0) and corpus != task_corpus(300, seed=1)
    assert len(corpus) == 300
    assert any(t.startswith(VIDEO_PROMPT) for t in corpus)
    for text in corpus:
        toks = [t.lower() for t in shapes._TOKEN_RE.findall(text)]
        assert set(toks) <= vocab, set(toks) - vocab
    for p in (*PROMPTS, VIDEO_PROMPT):
        assert {t.lower() for t in shapes._TOKEN_RE.findall(p)} <= vocab


def test_other_sizes_and_bad_args():
    t = ShapesTask(seed=3, image_size=128, grid=4)
    s = t.sample("heldout", 0)
    assert s.image.size == (128, 128)
    assert all(1 <= r <= 4 and 1 <= c <= 4 for _, _, r, c in s.objects)
    for kwargs in ({"grid": 1}, {"grid": 10}, {"image_size": 100, "grid": 3}, {"image_size": 30, "grid": 3}):
        with pytest.raises(ValueError):
            ShapesTask(**kwargs)
    t = ShapesTask(paraphrase=False)
    assert {t.text("train", i)[0] for i in range(20)} == {PROMPTS[0]}
    with pytest.raises(ValueError):
        t.sample("validation", 0)
    with pytest.raises(ValueError):
        t.sample("train", -1)


def test_render_examples(tmp_path):
    p = render_examples(tmp_path / "ex.png", n=3)
    img = Image.open(p)
    assert img.width > 3 * 96 and img.height > 96


def test_random_order_answers(task):
    from nemo_automodel_bard.data.chat_dataset import shapes_dataset

    shuffled = ShapesTask(seed=task.seed, order="random")
    moved = 0
    for i in range(20):
        a, b = shuffled.sample("train", i), task.sample("train", i)
        assert a.image.tobytes() == b.image.tobytes() and a.prompt == b.prompt and a.objects == b.objects
        assert sorted(parse_answer(a.answer)) == sorted(parse_answer(b.answer))  # same objects ...
        moved += a.answer != b.answer  # ... in another order
        assert shuffled.sample("train", i).answer == a.answer  # fixed per (seed, split, index)
        assert shuffled.text("train", i) == (a.prompt, a.answer)
        assert exact_match(a.answer, b.answer, order="random")
        assert exact_match(a.answer, b.answer) == (a.answer == b.answer)
    assert moved >= 18
    assert shapes_dataset("heldout", 2, order="random")[1]["messages"][-1]["content"][0]["text"] == \
        shuffled.sample("heldout", 1).answer
    assert score([a.answer], [b.answer], order="random")["exact_match"] == 1.0
    assert not exact_match("red circle 1 1, red circle 1 1.", "red circle 1 1.", order="random")  # multisets
    assert not exact_match("red circle one.", "red circle 1 1.", order="random")
    with pytest.raises(ValueError, match="order must be one of"):
        ShapesTask(order="sorted")


def test_subset_answers(task):
    from nemo_automodel_bard.data.shapes import SUBSET_PROMPTS, SUBSET_SIZE, valid_subset

    subset = ShapesTask(seed=task.seed, order="subset")
    chosen_first = set()
    for i in range(40):
        a, b = subset.sample("train", i), task.sample("train", i)
        assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects  # same images
        assert a.prompt in SUBSET_PROMPTS and str(SUBSET_SIZE) in a.prompt and "row column color shape" in a.prompt
        assert a.answer[0].isdigit()  # cell first
        listed = parse_answer(a.answer, cell_first=True)
        assert len(listed) == SUBSET_SIZE and set(listed) <= set(a.objects)
        assert listed == sorted(listed, key=lambda o: (o[2], o[3]))  # reading order
        assert valid_subset(a.answer, b.answer) and exact_match(a.answer, b.answer, order="subset")
        assert subset.text("train", i) == (a.prompt, a.answer) == (subset.sample("train", i).prompt, a.answer)
        chosen_first.add(a.objects.index(listed[0]))
    assert len(chosen_first) >= 3  # the subset is drawn, not always the first objects


@pytest.mark.parametrize(
    "pred, valid",
    [
        ("1 1 red circle, 2 2 green square, 3 1 red cross.", True),
        ("1 1 Red circle ; 1 2 blue cross,3 1 red cross", True),      # case, separators, final period
        ("2 2 green square, 1 1 red circle, 3 1 red cross.", False),  # not in reading order
        ("1 1 red circle, 1 1 red circle, 3 1 red cross.", False),    # a repeat
        ("1 1 red circle, 1 2 blue square, 3 1 red cross.", False),   # no blue square in the image
        ("1 1 red circle, 3 1 red cross.", False),                    # too few
        ("1 1 red circle, 1 2 blue cross, 2 2 green square, 3 1 red cross.", False),  # too many
        ("1 1 red circle, one two blue cross, 3 1 red cross.", False),  # malformed
        ("red circle 1 1, green square 2 2, red cross 3 1.", False),  # not cell first
        ("", False),
    ],
)
def test_valid_subset_table(pred, valid):
    from nemo_automodel_bard.data.shapes import valid_subset

    layout = "red circle 1 1, blue cross 1 2, green square 2 2, red cross 3 1."
    assert valid_subset(pred, layout) is valid
    assert exact_match(pred, layout, order="subset") is valid


def test_subset_score():
    layout = "red circle 1 1, blue cross 1 2, green square 2 2, red cross 3 1."
    preds = ["1 1 red circle, 1 2 blue cross, 3 1 red cross.",   # right
             "1 1 red circle, 1 2 blue square, 3 1 red cross.",  # 2 of 3 objects are the image's
             "2 2 green square, 1 1 red circle."]                 # out of order, 2 of the 3 asked for
    result = score(preds, [layout] * 3, order="subset")
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["field_accuracy"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert result["parsed"] == 1.0
    with pytest.raises(ValueError, match="order must be one of"):
        exact_match("a", "b", order="sorted")

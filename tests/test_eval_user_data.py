"""Pipeline evaluation on a user's own chat data: exact match plus token-level F1, no shapes-task targets or
field accuracy, and every unusable held-out record counted and listed in the report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from nemo_automodel_bard.pipeline.evaluate import (
    EvalDataError,
    _score,
    evaluate_model,
    heldout_records,
    records_from_chat,
    token_f1,
)
from nemo_automodel_bard.pipeline.report import write_report


def _chat(user, answer="A red circle."):
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def test_token_f1():
    assert token_f1("A red circle.", "a red  circle") == 1.0
    assert token_f1("a red square", "a red circle") == pytest.approx(2 / 3)
    assert token_f1("blue", "a red circle") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert token_f1("red red", "red") == pytest.approx(2 / 3)  # counts, not sets


def test_free_text_scores_without_shapes_fields():
    scores = _score("jsonl", ["A red circle.", "a red square", "nothing"], ["A red circle.", "a red circle", "x y"])
    assert scores["accuracy"] == pytest.approx(1 / 3) and "field_accuracy" not in scores
    assert scores["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert scores["correct"] == [True, False, False]


def test_unusable_records_are_left_out_and_listed(tmp_path):
    image = tmp_path / "ok.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    lines = [
        json.dumps(_chat("What is it?")),
        json.dumps(_chat("No answer here", None)),
        "{broken json",
        json.dumps(_chat([{"type": "image", "image": str(tmp_path / "missing.png")}, {"type": "text", "text": "?"}])),
        json.dumps(_chat([{"type": "image", "image": str(image)}, {"type": "text", "text": "Colour?"}], "red")),
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = heldout_records({"kind": "jsonl", "eval_path": str(path)}, 100)
    assert [r.reference for r in records] == ["A red circle.", "red"]
    assert [i for i, _ in records.unusable] == [1, 2, 3]
    reasons = dict(records.unusable)
    assert "no assistant turn" in reasons[1] and "missing.png" in reasons[3]

    path.write_text("\n".join(lines[1:4]) + "\n")
    with pytest.raises(EvalDataError, match="no usable record: record 0: no assistant turn"):
        heldout_records({"kind": "jsonl", "eval_path": str(path)}, 100)
    with pytest.raises(EvalDataError, match="record 0: no assistant turn"):  # the strict form is unchanged
        records_from_chat([_chat("x", None)])


def test_report_on_user_data_lists_left_out_records_and_no_targets(tiny_model_dir, tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_chat("What is it?"), _chat("hi", None), _chat("Say x", "x")]))
    records = heldout_records({"kind": "jsonl", "eval_path": str(path)}, 10)
    result = evaluate_model(tiny_model_dir, records, data_kind="jsonl", block_size=4, max_new_tokens=4, batch_size=2,
                            device="cpu")
    assert result["n"] == 2 and 0.0 <= result["token_f1"] <= 1.0 and "field_accuracy" not in result
    assert result["num_unusable"] == 1 and result["unusable_records"][0]["index"] == 1
    result.update(name="pbm_b4")
    result_file = tmp_path / "eval" / "pbm_b4@0.9.json"
    result_file.parent.mkdir()
    result_file.write_text(json.dumps(result))
    ctx = SimpleNamespace(
        outputs={"evaluate": {"entries": [{"result_file": str(result_file)}]}},
        output_dir=tmp_path / "out",
        cfg={"evaluate": {"thresholds": [0.9]}, "data": {"kind": "jsonl", "name": "mine"}, "model": {"name": "tiny"},
             "seed": 0},
        manifest=SimpleNamespace(entries={"pbm": {"seconds": 5.0}}),
    )
    write_report(ctx)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "nan" not in report and "token F1 %" in report
    assert "## Held-out records left out" in report and "record 1: no assistant turn" in report
    assert "NOT met" not in report and "met:" not in report  # the shapes-task targets are not applied
    assert "targets belong to the embedded shapes task" in report

"""A tiny local lmms-eval task (``bard_tiny``): JSON lines and PNG files on disk, scored by exact match.

``python -m nemo_automodel_bard.evaluation.tiny_task OUT_DIR`` (or :func:`write_tiny_task`) writes the task
folder; then::

    lmms-eval --model bard_vl --model_args pretrained=MODEL_DIR --tasks bard_tiny --include_path OUT_DIR

It checks the whole chain (task loading, visuals, batching, decoding, scoring) on a CPU in seconds; it is
not a benchmark. ``records`` lets a test put questions its toy model knows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

_UTILS = '''"""bard_tiny task functions (written by nemo_automodel_bard.evaluation.tiny_task)."""
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _normalise(text):
    return " ".join(str(text).strip().lower().rstrip(".").split())


def process_results(doc, results):
    return {"exact_match": float(_normalise(results[0]) == _normalise(doc["answer"]))}
'''

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def _picture(width: int, height: int, color: tuple[int, int, int]) -> Any:
    import numpy as np
    from PIL import Image

    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2] = color
    array[height // 2 :, : width // 2] = (250, 250, 250)
    return Image.fromarray(array)


def default_records() -> list[dict[str, Any]]:
    """Three questions: two about a picture, one text-only."""
    return [
        {"question": "What color is the top half of the picture?", "answer": "red", "image": _picture(64, 64, (200, 30, 30))},
        {"question": "What color is the top half of the picture?", "answer": "green", "image": _picture(96, 64, (30, 200, 30))},
        {"question": "How many sides does a triangle have?", "answer": "3", "image": None},
    ]


def write_tiny_task(out_dir: str | Path, records: Sequence[dict[str, Any]] | None = None, *,
                    task: str = "bard_tiny", max_new_tokens: int = 48) -> Path:
    """Write the task folder (YAML, ``utils.py``, ``data.jsonl``, images) and return it.

    ``records``: ``{"question", "answer", "image": PIL image | path | None}`` each.
    """
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(records if records is not None else default_records()):
        image = record.get("image")
        name = ""
        if image is not None:
            name = f"images/{i:04d}.png"
            if isinstance(image, (str, Path)):
                from PIL import Image

                image = Image.open(image)
            image.convert("RGB").save(out / name)
        lines.append(json.dumps({"id": i, "question": record["question"], "answer": record["answer"], "image": name}))
    (out / "data.jsonl").write_text("\n".join(lines) + "\n")
    (out / "utils.py").write_text(_UTILS)
    (out / f"{task}.yaml").write_text(_YAML.format(task=task, data=json.dumps(str(out / "data.jsonl")),
                                                    max_new_tokens=int(max_new_tokens)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_automodel_bard.evaluation.tiny_task",
                                     description="Write the tiny local lmms-eval task bard_tiny.")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    path = write_tiny_task(args.out_dir)
    print(f"wrote the bard_tiny task to {path} (use --include_path {path})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["default_records", "write_tiny_task"]

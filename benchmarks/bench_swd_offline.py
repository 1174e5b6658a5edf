"""SWD step time: online teacher vs the offline teacher cache (``bard.teacher_cache``), side by side.

One run, one machine, the same student, batch and data for both:

1. a tiny student (``write_tiny_checkpoint``, text 128 x 4) and two anchors sharing its tokenizer:
   one of the student's size and one 4x wider and twice as deep (the published setting distils 2B/4B
   students from an 8B anchor);
2. the shapes task, B_s = 16 student, B_t = 4 anchor, top-16 forward KD; for each anchor a cache of the
   training samples is built once (its cost is reported per sample);
3. ``--steps`` SWD steps (loss, backward, AdamW step) alternating online / offline on the same
   batches; reported: median step time, the ratio offline / online, and the anchor's parameter bytes
   that the offline run does not hold.

Writes ``docs/benchmarks/swd_offline.md`` (``--out``). ``python benchmarks/bench_swd_offline.py``
(about two minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nemo_automodel_bard import BardVLForConditionalGeneration
from nemo_automodel_bard.data.chat_dataset import shapes_dataset
from nemo_automodel_bard.data.collator import BardVLCollator
from nemo_automodel_bard.objectives.distillation import swd_training_loss
from nemo_automodel_bard.objectives.teacher_cache import TeacherTopKCache, build_teacher_cache
from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _params_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "swd_offline.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="bench-swd-"))
    student_dir = write_tiny_checkpoint(tmp / "student", seed=0, block_size=16)
    anchors = {
        "same size (text 128 x 4)": write_tiny_checkpoint(tmp / "anchor_same", seed=1, block_size=4),
        "4x wider, 2x deeper (text 512 x 8)": write_tiny_checkpoint(
            tmp / "anchor_wide", seed=2, block_size=4, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4),
    }
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(student_dir)
    collator = BardVLCollator(processor=processor, block_size=16, seed=0)
    data = shapes_dataset(split="train", size=args.batch * args.steps, seed=0)
    records = [data[i] for i in range(len(data))]
    batches = [collator(records[i : i + args.batch]) for i in range(0, len(records), args.batch)]

    rows = []
    for name, anchor_dir in anchors.items():
        teacher = BardVLForConditionalGeneration.from_pretrained(anchor_dir, dtype=torch.float32).eval()
        started = time.perf_counter()
        build_teacher_cache(teacher, records, collator, tmp / f"cache-{anchor_dir.name}", epochs=1,
                            teacher_block_size=4, top_k=16, batch_size=args.batch)
        build_s = (time.perf_counter() - started) / len(records)
        cache = TeacherTopKCache(tmp / f"cache-{anchor_dir.name}")
        students = {mode: BardVLForConditionalGeneration.from_pretrained(student_dir, dtype=torch.float32).train()
                    for mode in ("online", "offline")}
        optims = {mode: torch.optim.AdamW(m.parameters(), lr=1e-4) for mode, m in students.items()}
        times: dict[str, list[float]] = {"online": [], "offline": []}
        for step, batch in enumerate(batches):
            for mode in (("online", "offline") if step % 2 == 0 else ("offline", "online")):
                started = time.perf_counter()
                if mode == "offline":
                    values, ids = cache.lookup("train", 0, batch, kd_at_block_padding=False)
                    loss, _ = swd_training_loss(students[mode], None, batch, teacher_block_size=4,
                                                teacher_topk_values=values, teacher_topk_ids=ids)
                else:
                    loss, _ = swd_training_loss(students[mode], teacher, batch, teacher_block_size=4)
                loss.backward()
                optims[mode].step()
                optims[mode].zero_grad()
                if step:  # the first step warms up both
                    times[mode].append(time.perf_counter() - started)
        on, off = statistics.median(times["online"]), statistics.median(times["offline"])
        rows.append((name, _params_mb(teacher), on, off, off / on, build_s))
        del teacher

    lines = [
        "# SWD: online teacher vs offline teacher cache",
        "",
        f"Measured {_dt.date.today().isoformat()} on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; `python benchmarks/bench_swd_offline.py`.",
        f"Student: tiny Bard-VL (text 128 x 4), B=16; anchor B=4; top-16 forward KD; batch {args.batch} shapes samples;",
        f"median of {args.steps - 1} steps (loss + backward + AdamW), online and offline alternating on the same batches.",
        "",
        "| anchor | anchor weights (MiB, not held offline) | online step (s) | offline step (s) | offline / online | cache build (s per sample, once) |",
        "|---|---|---|---|---|---|",
    ]
    for name, mb, on, off, ratio, build_s in rows:
        lines.append(f"| {name} | {mb:.1f} | {on:.3f} | {off:.3f} | {ratio:.2f}x | {build_s:.4f} |")
    lines += [
        "",
        "The offline step runs no teacher forward: it reads the anchor's top-k at the KD positions from the cache",
        "(checking each sample's gold tokens and corruption levels). The larger the anchor is relative to the",
        "student, the more the offline run saves, as in the published setting (8B anchor, 2B/4B students).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The real-size rehearsal: every stage of ``bard-vl model=qwen3_vl_{2b,4b}`` on random-weight stand-ins, on CPU.

It builds (locally, no model hub):

* an AR stand-in of the student size and an AR stand-in of Qwen3-VL-8B (the published SWD teacher), each with the
  published configuration (:mod:`nemo_automodel_bard.models.qwen3_vl_sizes`) cut to ``--text-layers`` /
  ``--vision-layers`` layers, and Qwen3-VL's vocabulary layout and image processor
  (:mod:`nemo_automodel_bard.fixtures.qwen3_vl_standin`); the teacher is converted by AR init at B=4, as the published
  8B B=4 anchor;
* chat-format records (``data/train.jsonl``, ``data/val.jsonl``) whose images are at the PBM recipe's pixel cap
  (``processor.max_pixels``, 4,194,304 = 2048 x 2048, 4,096 visual tokens; ``--image-side`` smaller) and whose
  answers are long enough that the collator cuts every row at the recipe's ``max_length`` (8,192; ``--length``);

and then runs the real pipeline -- ``python -m nemo_automodel_bard.cli model=qwen3_vl_<size> data=jsonl ...`` with
the real-size recipe YAMLs (``recipes/qwen3_vl_<size>/``) -- for ``--steps`` optimizer steps per training stage:
AR init, PBM B = 2, 4, 8, 16, 32, SWD of the B=32 student from the 8B-width anchor (plus its no-KD control),
evaluation on ``--eval-records`` records and the report; then one ``bard-vl infer`` and one request to ``bard-vl
serve``. Training runs under ``torchrun`` with ``--nproc`` gloo processes, FSDP2 with the recipes' mixed precision
(bf16 compute over fp32 master weights).

What differs from the published recipes (each an override, listed in ``rehearsal.json``): the step count, the
global batch (one optimizer step = one micro-batch per rank at the recipe's ``local_batch_size``; the published 256
/ 64 rows would take hundreds of micro-batches per step), ``dist_env.backend=gloo`` (CPU) and
``model.attn_implementation=sdpa`` for student and teacher (FlexAttention has no CPU backward; SDPA with the dense
block-diffusion mask computes the same attention), and ``dataloader.num_workers`` (``--workers``). To save disk,
the optimizer state and model shards of a finished stage's checkpoint are deleted (its ``final`` export stays).

Its log (``rehearsal.log``) and summary (``rehearsal.json``, ``rehearsal.md``) give every stage's step times and
peak memory: per training stage the recipe's ``step_time`` and the ranks' peak resident set
(``host_peak_rss_sum_gib`` of ``training.jsonl``), and for every phase the peak resident set of the whole process
tree (pipeline, torchrun, ranks, loader workers), sampled every 0.2 s.

    python -m nemo_automodel_bard.pipeline.rehearsal --size 4b --out runs/rehearsal/4b
    scripts/rehearsal.sh --size 2b --length 2048 --text-layers 1 --vision-layers 1    # docs/rehearsal.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from nemo_automodel_bard.models import qwen3_vl_sizes as sizes

#: the PBM recipes' image cap (processor.max_pixels): 2048 x 2048
PBM_MAX_PIXELS = 4_194_304
TEACHER_SIZE = "8b"
#: ``--ci``: narrow text and vision towers (vocabulary, special ids, head_dim 128, mRoPE, DeepStack kept), for the
#: test suite; the student and the teacher keep different widths
CI_NARROW = {
    "student": {"text": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                         "num_key_value_heads": 1},
                "vision": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128}},
    "teacher": {"text": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
                         "num_key_value_heads": 1},
                "vision": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256}},
}
_WORDS = ("red", "blue", "green", "circle", "square", "triangle", "row", "column", "left", "right", "top", "bottom",
          "there", "are", "shapes", "in", "the", "image", "and", "a", "of", "with", "one", "two", "three", "four")


def _tree_rss(proc: Any) -> int:
    """Resident set of a process and all its descendants (bytes)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except Exception:  # noqa: BLE001 - a process that just ended
            pass
    return total


def run_measured(cmd: list[str], log: Path, *, env: dict | None = None, cwd: str | None = None,
                 interval: float = 0.2, on_poll: Any = None) -> dict[str, Any]:
    """Run ``cmd`` (output appended to ``log``); return its exit status, seconds and the peak resident set of its
    whole process tree (GiB, sampled every ``interval`` s). ``on_poll()`` is called at every sample."""
    import psutil

    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, _tree_rss(proc))
            if on_poll is not None:
                on_poll()
            time.sleep(interval)
    return {"returncode": child.returncode, "seconds": round(time.perf_counter() - started, 1),
            "peak_tree_rss_gib": round(peak / 2**30, 2)}


def _image(path: Path, side: int, seed: int) -> None:
    """A ``side`` x ``side`` PNG of coloured shapes (the content does not matter to random weights)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = rng.randrange(side), rng.randrange(side), rng.randrange(side // 16, side // 4)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img.save(path)


def write_records(data_dir: Path, *, count: int, image_side: int, answer_words: int, seed: int = 0) -> Path:
    """``count`` chat records with one ``image_side``-pixel square image and an answer of ``answer_words`` words."""
    import random

    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        name = f"images/{seed}_{i}.png"
        _image(data_dir / name, image_side, seed * 1000 + i)
        answer = " ".join(rng.choice(_WORDS) for _ in range(answer_words))
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": name},
                                         {"type": "text", "text": "Describe every shape in the image."}]},
            {"role": "assistant", "content": answer}]}))
    path = data_dir / ("train.jsonl" if seed == 0 else "val.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def build(out: Path, size: str, text_layers: int, vision_layers: int, *, length: int, image_side: int,
          records: int, eval_records: int, log: Path, ci: bool = False) -> dict[str, Any]:
    """Stand-ins (student size and 8B), the 8B anchor at B=4, and the records; reuses what is already there."""
    from nemo_automodel_bard.fixtures.qwen3_vl_standin import build_qwen3_vl_processor, write_qwen3_vl_standin
    from nemo_automodel_bard.recipes.ar_init import convert_ar_to_bard

    started = time.perf_counter()
    models = out / ("standins_ci" if ci else "standins")
    student = models / f"qwen3_vl_{size}_t{text_layers}_v{vision_layers}"
    teacher = models / f"qwen3_vl_{TEACHER_SIZE}_t{text_layers}_v{vision_layers}"
    anchor = models / f"bard_vl_{TEACHER_SIZE}_t{text_layers}_v{vision_layers}_b4"
    processor = None
    for path, which, seed, role in ((student, size, 1, "student"), (teacher, TEACHER_SIZE, 2, "teacher")):
        if not (path / "standin.json").is_file():
            processor = processor or build_qwen3_vl_processor()
            write_qwen3_vl_standin(path, which, text_layers=text_layers, vision_layers=vision_layers, seed=seed,
                                   processor=processor, narrow=CI_NARROW[role] if ci else None)
    if not (anchor / "config.json").is_file():
        convert_ar_to_bard(teacher, anchor, block_size=4, overwrite=True)
    data = out / f"data_L{length}_px{image_side}"
    visual_tokens = (image_side // 32) ** 2
    # answer words: enough that [prompt | clean answer | noisy answer] exceeds the row length (the collator cuts it)
    words = max(64, (length - visual_tokens) // 2 + 64)
    if not (data / "val.jsonl").is_file():
        write_records(data, count=records, image_side=image_side, answer_words=words, seed=0)
        write_records(data, count=eval_records, image_side=image_side, answer_words=64, seed=1)
    info = {"student_ar": str(student), "teacher_ar": str(teacher), "anchor": str(anchor), "data": str(data),
            "visual_tokens_per_image": visual_tokens, "answer_words": words,
            "build_seconds": round(time.perf_counter() - started, 1)}
    with open(log, "a") as f:
        f.write(json.dumps({"build": info}) + "\n")
    return info


def _recipe_local_batch(size: str, recipe: str) -> int:
    import yaml

    from nemo_automodel_bard.pipeline.app import REPO_ROOT

    cfg = yaml.safe_load((REPO_ROOT / "recipes" / f"qwen3_vl_{size}" / recipe).read_text())
    return int(cfg["step_scheduler"]["local_batch_size"])


def pipeline_overrides(args: argparse.Namespace, built: dict[str, Any], work_dir: Path) -> list[str]:
    """The ``bard-vl`` command line of the rehearsal (Hydra overrides)."""

    def recipe_keys(recipe: str, teacher: bool) -> str:
        local = args.local_batch or _recipe_local_batch(args.size, recipe)
        keys = {"dist_env.backend": "gloo", "model.attn_implementation": "sdpa",
                "step_scheduler.local_batch_size": local, "step_scheduler.global_batch_size": local * args.nproc,
                "dataloader.num_workers": args.workers, "dataloader.collate_fn.max_length": args.length}
        if teacher:
            keys["teacher_model.attn_implementation"] = "sdpa"
        return "{" + ", ".join(f"{k}: {v}" for k, v in keys.items()) + "}"

    data = Path(built["data"])
    return [
        f"model=qwen3_vl_{args.size}", f"model.init={built['student_ar']}", "data=jsonl",
        f"data.path={data / 'train.jsonl'}", f"data.root={data}", f"data.eval_path={data / 'val.jsonl'}",
        f"work_dir={work_dir}", f"run_name=rehearsal-{args.size}",
        *(["launcher=torchrun", f"launcher.nproc_per_node={args.nproc}"] if args.launcher == "torchrun"
          else ["launcher=local", "launcher.nproc_per_node=1", "launcher.isolate=false"]),
        f"threads={args.threads}",
        f"pbm.block_sizes={list(args.block_sizes)}".replace(" ", ""),
        f"pbm.max_steps={args.steps}", f"swd.max_steps={args.steps}", f"swd.anchor_path={built['anchor']}",
        f"swd.student_block_sizes=[{args.block_sizes[-1]}]", f"swd.control={str(args.control).lower()}",
        f"+pbm.overrides={recipe_keys('pbm.yaml', False)}", f"+swd.overrides={recipe_keys('swd.yaml', True)}",
        f"evaluate.num_samples={args.eval_records}", "evaluate.batch_size=1",
        f"evaluate.max_new_tokens={args.max_new_tokens}", "evaluate.speed_samples=0", "evaluate.device=cpu",
        "evaluate.ar_baseline=false",
    ]


def _drop_finished_checkpoints(work_dir: Path) -> None:
    """Delete the optimizer state and model shards of finished training runs (their ``final`` export stays)."""
    for export in work_dir.glob("*/export.json"):
        run = export.parent
        for ckpt in run.glob("epoch_*_step_*"):
            shutil.rmtree(ckpt / "optim", ignore_errors=True)
            for shard in (ckpt / "model").glob("shard-*.safetensors"):
                shard.unlink(missing_ok=True)


def stage_table(work_dir: Path) -> list[dict[str, Any]]:
    """Per training run of the pipeline: steps, step times and peak resident sets from its ``training.jsonl``."""
    rows = []
    for jsonl in sorted(work_dir.glob("*/training.jsonl"), key=lambda p: p.stat().st_mtime):
        steps = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        if not steps:
            continue
        rows.append({
            "stage": jsonl.parent.name.rsplit("-", 1)[0], "steps": len(steps),
            "step_time_s": [round(float(s["step_time"]), 1) for s in steps],
            "tokens_per_step": [int(s.get("num_tokens_per_step", 0)) for s in steps],
            "loss": [round(float(s["loss"]), 3) for s in steps],
            "peak_rss_rank0_gib": round(max(float(s.get("host_peak_rss_gib", 0.0)) for s in steps), 2),
            "peak_rss_ranks_gib": round(max(float(s.get("host_peak_rss_sum_gib", 0.0)) for s in steps), 2),
        })
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_once(model_dir: str, media_root: Path, image: str, log: Path, *, max_tokens: int,
               block_size: int) -> dict[str, Any]:
    """Start ``bard-vl serve`` on ``model_dir``, send one chat request with ``image``, stop it."""
    import psutil

    port = _free_port()
    cmd = [sys.executable, "-m", "nemo_automodel_bard.cli", "serve", model_dir, "--port", str(port), "--device",
           "cpu", "--media-root", str(media_root), "--model-name", "rehearsal"]
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base, peak, started = f"http://127.0.0.1:{port}", 0, time.perf_counter()
    result: dict[str, Any] = {"ok": False}
    try:
        while True:
            peak = max(peak, _tree_rss(psutil.Process(server.pid)))
            if server.poll() is not None:
                raise RuntimeError(f"bard-vl serve exited with {server.returncode} (see {log})")
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=5).read()
                break
            except OSError:
                time.sleep(1.0)
        body = json.dumps({"model": "rehearsal", "max_tokens": max_tokens, "block_size": block_size,
                           "messages": [{"role": "user", "content": [
                               {"type": "image_url", "image_url": {"url": image}},
                               {"type": "text", "text": "Describe every shape in the image."}]}]}).encode()
        request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        sent = time.perf_counter()
        reply: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            with urllib.request.urlopen(request, timeout=1800) as response:
                reply.update(json.loads(response.read()))
            done.set()

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        while worker.is_alive():
            peak = max(peak, _tree_rss(psutil.Process(server.pid)))
            worker.join(0.2)
        if not reply:
            raise RuntimeError("no reply from bard-vl serve")
        tokens = int(reply["usage"]["completion_tokens"])
        result = {"ok": tokens > 0, "completion_tokens": tokens, "prompt_tokens": int(reply["usage"]["prompt_tokens"]),
                  "finish_reason": reply["choices"][0]["finish_reason"],
                  "request_seconds": round(time.perf_counter() - sent, 1)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    result.update(seconds=round(time.perf_counter() - started, 1), peak_tree_rss_gib=round(peak / 2**30, 2))
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Rehearsal: Qwen3-VL-{s['size'].upper()} width, {TEACHER_SIZE.upper()}-width teacher",
             "", f"{s['text_layers']} text / {s['vision_layers']} vision layers, rows up to {s['length']} tokens, "
             f"images {s['image_side']}x{s['image_side']} px, {s['nproc']} gloo processes, {s['steps']} steps per "
             f"stage, {s['threads']} thread(s) per process. Passed: **{result['passed']}**.", "",
             "| stage | steps | step time (s) | tokens / step | loss | peak RSS rank 0 (GiB) | peak RSS all ranks (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for row in result.get("stages", []):
        lines.append(f"| {row['stage']} | {row['steps']} | {', '.join(map(str, row['step_time_s']))} | "
                     f"{', '.join(map(str, row['tokens_per_step']))} | {', '.join(map(str, row['loss']))} | "
                     f"{row['peak_rss_rank0_gib']} | {row['peak_rss_ranks_gib']} |")
    lines += ["", "| phase | ok | seconds | peak RSS of the process tree (GiB) |", "|---|---|---|---|"]
    for name, phase in result.get("phases", {}).items():
        lines.append(f"| {name} | {phase.get('returncode', 0) == 0 and phase.get('ok', True)} | "
                     f"{phase.get('seconds')} | {phase.get('peak_tree_rss_gib')} |")
    return "\n".join(lines) + "\n"


def rehearse(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "rehearsal.log"
    log.unlink(missing_ok=True)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"}
    result: dict[str, Any] = {"settings": settings, "phases": {}, "passed": False,
                              "config": {"student": sizes.HUB_IDS[args.size], "teacher": sizes.HUB_IDS[TEACHER_SIZE],
                                         "student_text": sizes.text_config(args.size, args.text_layers),
                                         "student_vision": sizes.vision_config(args.size, args.vision_layers),
                                         "teacher_text": sizes.text_config(TEACHER_SIZE, args.text_layers),
                                         "teacher_vision": sizes.vision_config(TEACHER_SIZE, args.vision_layers)}}

    def save() -> None:
        (out / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "rehearsal.md").write_text(summary_markdown(result))

    started = time.perf_counter()
    built = build(out, args.size, args.text_layers, args.vision_layers, length=args.length, image_side=args.image_side,
                  records=max(args.records, args.nproc * args.steps * 2), eval_records=args.eval_records, log=log,
                  ci=args.ci)
    result["build"] = built
    work_dir = out / "run"
    overrides = pipeline_overrides(args, built, work_dir)
    result["command"] = "bard-vl " + " ".join(overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"[rehearsal] {result['command']}", flush=True)
    last_clean = [0.0]

    def tidy() -> None:
        if time.perf_counter() - last_clean[0] > 5:
            last_clean[0] = time.perf_counter()
            _drop_finished_checkpoints(work_dir)

    phase = run_measured([sys.executable, "-m", "nemo_automodel_bard.cli", *overrides], log, env=env,
                         on_poll=tidy if args.drop_checkpoints else None)
    if args.drop_checkpoints:
        _drop_finished_checkpoints(work_dir)
    result["phases"]["pipeline"] = phase
    result["stages"] = stage_table(work_dir)
    save()
    if phase["returncode"] != 0:
        print(f"[rehearsal] the pipeline failed (exit {phase['returncode']}); see {log}", file=sys.stderr)
        return result
    from .manifest import Manifest

    final = Manifest(work_dir).entries["stage:swd"]["outputs"][f"kd_b{args.block_sizes[-1]}_dir"]
    eval_dir = work_dir / "eval"
    result["evaluation"] = {p.stem: {k: v for k, v in json.loads(p.read_text()).items()
                                     if k in ("exact_match", "tokens_per_forward", "num_samples", "block_size")}
                            for p in sorted(eval_dir.glob("*.json"))}
    image = json.loads(Path(built["data"], "val.jsonl").read_text().splitlines()[0])["messages"][0]["content"][0]["image"]
    infer = run_measured([sys.executable, "-m", "nemo_automodel_bard.cli", "infer", final, "--image",
                          str(Path(built["data"]) / image), "--prompt", "Describe every shape in the image.",
                          "--block-size", str(args.block_sizes[-1]), "--max-new-tokens", str(args.max_new_tokens),
                          "--device", "cpu", "--json"], log, env=env)
    result["phases"]["infer"] = infer
    save()
    try:
        result["phases"]["serve"] = serve_once(final, Path(built["data"]), image, log, max_tokens=args.max_new_tokens,
                                               block_size=args.block_sizes[-1])
    except Exception as exc:  # noqa: BLE001 - reported, the rehearsal fails
        result["phases"]["serve"] = {"ok": False, "error": repr(exc)}
    stage_names = [row["stage"] for row in result["stages"]]
    wanted = [f"pbm_b{b}" for b in args.block_sizes] + [f"swd_kd_b{args.block_sizes[-1]}"]
    result["passed"] = (infer["returncode"] == 0 and bool(result["phases"]["serve"].get("ok"))
                        and all(w in stage_names for w in wanted)
                        and all(r["steps"] == args.steps for r in result["stages"]) and bool(result["evaluation"]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    save()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nemo_automodel_bard.pipeline.rehearsal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("2b", "4b", "8b"), default="4b", help="the student's published width")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/rehearsal/<size>")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=8192, help="row length (the recipes' max_length: 8192)")
    parser.add_argument("--image-side", type=int, default=2048,
                        help="image side in pixels (2048: the PBM recipes' cap of 4,194,304 pixels)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (gloo)")
    parser.add_argument("--launcher", choices=("torchrun", "local"), default="torchrun",
                        help="local: one process, every stage in the pipeline's own process (the CI-sized run)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per training stage")
    parser.add_argument("--local-batch", type=int, default=None, help="rows per rank and step (default: the recipe's)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--records", type=int, default=8, help="training records")
    parser.add_argument("--eval-records", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers per rank (recipes: 4)")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="no equal-step SWD control without KD")
    parser.add_argument("--ci", action="store_true",
                        help="narrow towers (CI_NARROW) at the real vocabulary, special ids, head_dim and mRoPE")
    parser.add_argument("--keep-checkpoints", dest="drop_checkpoints", action="store_false",
                        help="keep the optimizer state of finished stages")
    args = parser.parse_args(argv)
    if args.launcher == "local":
        args.nproc = 1
    if args.out is None:
        args.out = Path("runs/rehearsal") / args.size
    if args.image_side % 32 or args.image_side * args.image_side > PBM_MAX_PIXELS:
        parser.error(f"--image-side must be a multiple of 32 with at most {PBM_MAX_PIXELS} pixels")
    return args


def main(argv: list[str] | None = None) -> int:
    result = rehearse(parse_args(argv))
    print(summary_markdown(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Memory and time model of Bard-VL training at the published Qwen3-VL widths, measured on the CPU.

For each published width (:mod:`nemo_automodel_bard.models.qwen3_vl_sizes`) it builds random-weight stand-ins at a few
depths and measures, in one process, one training forward and backward with bf16 autocast over fp32 weights (the
recipes' precision):

* **text**: the PBM objective (:func:`diffusion_training_loss`, dense block-diffusion mask) on one text row of
  ``L`` tokens (``[prompt | clean | noisy]``, block 32; the row builder of ``bench_training_step.py``), at 1 and 2
  text layers and several ``L``;
* **vision**: the vision tower (patch embedding, blocks, DeepStack mergers) on one image of ``P`` patches, at 1 and
  2 vision layers and several ``P``.

Memory is the bytes of the tensors autograd saves for the backward pass (``saved_tensors_hooks``, each storage
counted once, parameters excluded): the activation memory a GPU holds at the end of the forward pass, which is
what grows with depth and length. It is counted, not sampled, so it does not depend on the host allocator or on the
other processes of the machine. Time is the wall-clock of forward + backward on the CPU (indicative: a shared
2-core machine). The fit gives, per text layer, ``a + b*L + c*L^2`` bytes (``c``: the attention probabilities the
CPU's dense SDPA keeps; FlexAttention on a GPU keeps none) and per vision layer ``a + b*P + c*P^2``.

    python benchmarks/memory_model.py --out docs/benchmarks/memory_model.json
    python benchmarks/memory_model.py --quick          # one width, short rows (tests/test_memory_model.py)

``--table`` prints the per-GPU projection of docs/memory_model.md from a saved JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_training_step  # noqa: E402

from nemo_automodel_bard.models import qwen3_vl_sizes as sizes  # noqa: E402

GiB = 2**30


def saved_bytes(fn) -> tuple[int, torch.Tensor, set[int]]:
    """Run ``fn`` (a forward pass) and count the bytes of the storages autograd saves for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a view of a wrapper)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def _model(size: str, text_layers: int, vision_layers: int):
    from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration

    config = sizes.bard_vl_config(size, text_layers, vision_layers, block_size=bench_training_step.BLOCK)
    torch.manual_seed(0)
    # bf16 weights: the same activations as fp32 master weights under bf16 autocast, without the cast copies
    return BardVLForConditionalGeneration(config).to(torch.bfloat16)


def measure_text(size: str, layers: int, length: int) -> dict:
    from nemo_automodel_bard.objectives.block_diffusion import diffusion_training_loss

    model = _model(size, layers, 1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = bench_training_step.build_batch(length)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen, (loss, _) = saved_bytes(lambda: diffusion_training_loss(model, batch, attention="dense"))
    forward = time.perf_counter() - started
    loss.backward()
    total = time.perf_counter() - started
    act = sum(v for k, v in seen.items() if k not in params)
    return {"part": "text", "size": size, "layers": layers, "length": length, "saved_bytes": act,
            "loss_positions": int(batch["loss_positions"].numel()), "forward_s": round(forward, 2),
            "step_s": round(total, 2)}


def measure_vision(size: str, layers: int, side_patches: int) -> dict:
    model = _model(size, 1, layers)
    visual = model.model.visual
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    v = sizes.vision_config(size, layers)
    grid = torch.tensor([[1, side_patches, side_patches]])
    patches = side_patches * side_patches
    pixels = torch.randn(patches, 3 * v["temporal_patch_size"] * v["patch_size"] ** 2)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen, out = saved_bytes(lambda: visual(pixels, grid_thw=grid))
    forward = time.perf_counter() - started
    outs = out if isinstance(out, (tuple, list)) else (out,)
    flat = []
    for o in outs:
        if hasattr(o, "pooler_output"):  # a ModelOutput
            o = [o[0], *(o.get("deepstack_features") or [])]
        flat.extend(o if isinstance(o, (list, tuple)) else [o])
    sum(t.float().sum() for t in flat if isinstance(t, torch.Tensor) and t.requires_grad).backward()
    total = time.perf_counter() - started
    act = sum(val for k, val in seen.items() if k not in params)
    return {"part": "vision", "size": size, "layers": layers, "patches": patches, "saved_bytes": act,
            "forward_s": round(forward, 2), "step_s": round(total, 2)}


def fit(points: list[dict], x_key: str) -> dict:
    """Per-layer bytes ``a + b*x + c*x^2`` (from the difference between depths at each x) and the depth-independent
    rest ``r0 + r1*x`` (embedding, logits, mergers), least squares; seconds per layer ``t1*x + t2*x^2``."""
    xs = sorted({p[x_key] for p in points})
    per_layer, rest, t_layer = [], [], []
    for x in xs:
        at = {p["layers"]: p for p in points if p[x_key] == x}
        if 1 in at and 2 in at:
            per_layer.append((x, at[2]["saved_bytes"] - at[1]["saved_bytes"]))
            rest.append((x, 2 * at[1]["saved_bytes"] - at[2]["saved_bytes"]))
            t_layer.append((x, at[2]["step_s"] - at[1]["step_s"]))
    out = {"x": x_key, "per_layer_points": per_layer, "rest_points": rest, "time_points": t_layer}
    if len(per_layer) >= 3:
        X = np.array([[1.0, x, x * x] for x, _ in per_layer])
        out["per_layer"] = np.linalg.lstsq(X, np.array([b for _, b in per_layer], float), rcond=None)[0].tolist()
    elif len(per_layer) == 1:  # one length: proportional to it (the intercept is ~0 with bf16 weights)
        out["per_layer"] = [0.0, per_layer[0][1] / per_layer[0][0], 0.0]
    elif per_layer:
        X = np.array([[1.0, x] for x, _ in per_layer])
        out["per_layer"] = [*np.linalg.lstsq(X, np.array([b for _, b in per_layer], float), rcond=None)[0].tolist(), 0.0]
    if len(rest) == 1:
        out["rest"] = [0.0, rest[0][1] / rest[0][0]]
    elif rest:
        X = np.array([[1.0, x] for x, _ in rest])
        out["rest"] = np.linalg.lstsq(X, np.array([b for _, b in rest], float), rcond=None)[0].tolist()
    if len(t_layer) == 1:
        out["time_per_layer"] = [t_layer[0][1] / t_layer[0][0], 0.0]
    elif t_layer:
        X = np.array([[x, x * x] for x, _ in t_layer])
        out["time_per_layer"] = np.linalg.lstsq(X, np.array([t for _, t in t_layer], float), rcond=None)[0].tolist()
    return out


def with_fits(result: dict) -> dict:
    """``result`` with ``fits`` recomputed from its ``points`` (per part and width)."""
    result["fits"] = {}
    for part, x_key in (("text", "length"), ("vision", "patches")):
        for size in sorted({p["size"] for p in result["points"] if p["part"] == part}):
            result["fits"][f"{part}_{size}"] = fit([p for p in result["points"] if p["part"] == part
                                                    and p["size"] == size], x_key)
    return result


def run(plan: dict) -> dict:
    result = {"host": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "points": [], "fits": {}}
    # each part at each size: one and two layers at every planned row length / image side, then the per-layer fit
    for part, measure, x_key in (("text", measure_text, "length"), ("vision", measure_vision, "patches")):
        for size, xs in plan[part].items():
            for x in xs:
                for layers in (1, 2):
                    point = measure(size, layers, x)
                    print(json.dumps(point), flush=True)
                    result["points"].append(point)
            result["fits"][f"{part}_{size}"] = fit([p for p in result["points"] if p["part"] == part
                                                    and p["size"] == size], x_key)
    return result


#: the full plan (docs/memory_model.md): 4B at three row lengths, 2B and 8B at two; vision at two image sizes
FULL = {"text": {"4b": [1024, 2048, 4096], "2b": [1024, 2048], "8b": [1024, 2048]},
        "vision": {"4b": [32, 64], "8b": [32, 64]}}  # 32x32 = 1024 and 64x64 = 4096 patches
QUICK = {"text": {"2b": [256]}, "vision": {"2b": [8]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", type=Path, default=None, help="print the projection of a saved JSON and exit")
    parser.add_argument("--text", action="append", default=None, metavar="SIZE:L1,L2",
                        help="text points to measure (repeatable; default: the full plan)")
    parser.add_argument("--vision", action="append", default=None, metavar="SIZE:S1,S2",
                        help="vision points: image side in patches (repeatable)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="also take the points of these files (JSON results or logs of point lines)")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())), end="")
        return 0
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.text is not None or args.vision is not None:
        plan = {"text": {}, "vision": {}}
        for part, specs in (("text", args.text or []), ("vision", args.vision or [])):
            for spec in specs:
                size, values = spec.split(":")
                plan[part][size] = [int(x) for x in values.split(",")]
    result = run(plan)
    for path in args.merge:
        text = path.read_text()
        try:
            result["points"] = json.loads(text)["points"] + result["points"]
        except (json.JSONDecodeError, KeyError):
            result["points"] = [json.loads(line) for line in text.splitlines() if line.startswith('{"part"')] + \
                result["points"]
    with_fits(result)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0



# ----------------------------------------------------------------------------------------------------------------
# The per-GPU projection (docs/memory_model.md)

#: published per-GPU settings (recipes/qwen3_vl_*/): rows per GPU, FSDP2 over 8 GPUs, tp 1, activation checkpointing
PUBLISHED = {
    "2b": {"pbm_rows": 2, "swd_rows": 1, "gpus": 8, "checkpointing": False},
    "4b": {"pbm_rows": 1, "swd_rows": 1, "gpus": 8, "checkpointing": True},
    "8b": {"pbm_rows": 1, "swd_rows": 1, "gpus": 8, "checkpointing": True},
}
ROW = 8192                 # dataloader.collate_fn.max_length
PBM_PATCHES = 16_384       # processor.max_pixels 4,194,304 / 16^2 (one image per row at the cap)
SWD_PATCHES = 4_096        # SWD: processor.max_pixels 1,048,576 / 16^2
OVERHEAD_GIB = 4.0         # CUDA context, allocator fragmentation, communication buffers (assumed)


def _per_layer(fit_: dict, x: float, quadratic: bool) -> float:
    a, b, c = fit_["per_layer"]
    return max(a, 0.0) + b * x + (c * x * x if quadratic else 0.0)


def project(result: dict, size: str, stage: str, *, checkpointing: bool | None = None, gpus: int | None = None,
            teacher_offload: bool = False) -> dict:
    """Per-GPU memory (GiB) of one training step of ``size`` in ``stage`` (``pbm`` or ``swd``) at the published
    settings. FlexAttention (GPU) keeps no attention probabilities: only the linear terms of the fits are used."""
    pub = PUBLISHED[size]
    gpus = gpus or pub["gpus"]
    checkpointing = pub["checkpointing"] if checkpointing is None else checkpointing
    rows = pub[f"{stage}_rows"]
    patches = PBM_PATCHES if stage == "pbm" else SWD_PATCHES
    count = sizes.parameter_count(size)
    t, v = sizes.text_config(size), sizes.vision_config(size)
    text_fit = result["fits"].get(f"text_{size}") or result["fits"]["text_4b"]
    vision_key = "vision_8b" if size == "8b" else "vision_4b"
    vision_fit = result["fits"][vision_key]
    state = 16 * count["total"] / gpus  # fp32 weights 4 + gradients 4 + AdamW moments 8, sharded by FSDP2
    working = 2 * (count["embedding"] + count["lm_head"]) + 2 * 2 * max(count["text_layer"], count["vision_layer"])
    layers, depth = t["num_hidden_layers"], v["depth"]
    per_text = _per_layer(text_fit, ROW, quadratic=False)
    per_vision = _per_layer(vision_fit, patches, quadratic=False)
    if checkpointing:  # each layer keeps its bf16 input; one layer's activations are rebuilt at a time
        text_act = layers * 2 * t["hidden_size"] * ROW + per_text
        vision_act = depth * 2 * v["hidden_size"] * patches + per_vision
    else:
        text_act, vision_act = layers * per_text, depth * per_vision
    r0, r1 = text_fit["rest"]
    rest = max(r0, 0.0) + r1 * ROW  # embedding output, logits at the loss positions, loss
    activations = rows * (text_act + vision_act + rest)
    teacher = 0.0
    if stage == "swd":
        teacher_count = sizes.parameter_count("8b")["total"]
        teacher = 0.0 if teacher_offload else 2 * teacher_count  # bf16, whole on every GPU (not sharded)
    total = state + working + activations + teacher + OVERHEAD_GIB * GiB
    return {"size": size, "stage": stage, "gpus": gpus, "rows": rows, "checkpointing": checkpointing,
            "teacher_offload": teacher_offload, "state_gib": state / GiB, "working_gib": working / GiB,
            "activations_gib": activations / GiB, "teacher_gib": teacher / GiB, "total_gib": total / GiB}


def table(result: dict) -> str:
    lines = ["| model | stage | rows/GPU | act. ckpt | teacher | state | working bf16 | activations | teacher | "
             "total | H100 80 GB | H200 141 GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes.SIZES:
        for stage in ("pbm", "swd"):
            variants = [{}, {"checkpointing": not PUBLISHED[size]["checkpointing"]}]
            if stage == "swd":
                variants.append({"teacher_offload": True})
            for extra in variants:
                p = project(result, size, stage, **extra)
                gb = p["total_gib"] * GiB / 1e9
                lines.append(
                    f"| {size.upper()} | {stage.upper()} | {p['rows']} | {'on' if p['checkpointing'] else 'off'} | "
                    f"{'offloaded' if p['teacher_offload'] else ('8B bf16 on GPU' if stage == 'swd' else '-')} | "
                    f"{p['state_gib']:.1f} | {p['working_gib']:.1f} | {p['activations_gib']:.1f} | "
                    f"{p['teacher_gib']:.1f} | {p['total_gib']:.1f} GiB ({gb:.0f} GB) | "
                    f"{'fits' if gb <= 80 else 'no'} | {'fits' if gb <= 141 else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

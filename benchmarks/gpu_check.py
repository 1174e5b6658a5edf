"""GPU acceptance check of Bard-VL at the width of Qwen3-VL-4B (run through ``scripts/gpu_check.sh``).

A prepared script for the few minutes a GPU is lent: it builds a random-weight stand-in with Qwen3-VL-4B's published
widths (text: hidden 2560, MLP 9728, 32 heads, 8 KV heads, head_dim 128, interleaved mRoPE [24, 20, 20], the real
vocabulary of 151,936 rows, tied embeddings; vision: hidden 1024, MLP 4096, 16 heads, DeepStack mergers into the
2560-wide text tower) at full depth (36 text, 24 vision layers) and measures, with time and peak memory:

* **one PBM training step** -- the block-diffusion objective of the PBM recipe
  (:func:`~nemo_automodel_bard.objectives.block_diffusion.diffusion_training_loss`) on one ``[prompt | clean |
  noisy]`` text row (the row builder of ``benchmarks/bench_training_step.py``, block size 32), forward, backward and
  an optimizer step over fp32 master weights with bf16 compute (autocast), as the real-size recipes train (AdamW
  where the card holds its fp32 state, else SGD: :func:`make_optimizer`);
* **one SWD step** -- :func:`~nemo_automodel_bard.objectives.distillation.swd_training_loss` on the same row with
  top-16 forward KD from an anchor at block size 4. The anchor is the student's own weights seen with the B=4 mask
  (no second copy: a separate 4B teacher would not fit next to the AdamW state on an 80 GB card); the teacher's
  forward pass, its mask and the KD term are all paid for;
* **the decode per-forward cost** -- the text tower of ``benchmarks/gpu_forward_cost.py`` in bf16: one forward of 1
  new token (an AR step) against one of a 16- and a 32-token block (a block-diffusion step) over the same cached
  prompt, logits for every query row, eager mode;
* **compiled decoding** -- the Bard-VL decoder itself, eager against ``compile=True`` (static KV cache, the step
  compiled with CUDA graphs; ``benchmarks/bench_compiled.py``), ms per forward of the AR step and of the B = 16 /
  B = 32 steps at batch 1, with identical tokens required (a stand-in with 12 of the 36 text layers, so the
  compile fits the budget; the dry run uses the tiny test sizes);
* **a serving smoke request** -- ``bard-vl serve``'s server in this process (a tiny random checkpoint: the stand-in
  has no tokenizer of its own) answers one chat request on the same device.

It writes ``gpu_check.json`` (every figure, the configuration, pass / fail of each check) and ``gpu_check.md``
(a short summary) into ``--out``. ``--dry-run`` runs the same code on the CPU with the same widths and vocabulary
but one text and one vision layer, rows of 256 tokens, no warm-up and the tied embedding frozen (its gradient and
AdamW state, 4.5 GiB, would triple the run's time on a CPU), so CI can check the script itself (about a minute on
two CPU cores).
Exit status: 0 when every check passed, 1 otherwise, 2 for a usage error (no CUDA device without ``--dry-run``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks this check reuses

import bench_compiled  # noqa: E402
import bench_training_step  # noqa: E402
import gpu_forward_cost  # noqa: E402

from nemo_automodel_bard.models import qwen3_vl_sizes  # noqa: E402

#: Qwen3-VL-4B-Instruct's published text and vision towers and special ids (one owner:
#: nemo_automodel_bard.models.qwen3_vl_sizes); the depths are set per run
QWEN3_VL_4B_TEXT = qwen3_vl_sizes.text_config("4b")
QWEN3_VL_4B_VISION = qwen3_vl_sizes.vision_config("4b")
#: Qwen3-VL's special-token ids (Bard-VL's MASK is the unused row 151671, picked by AR init)
SPECIAL_IDS = dict(qwen3_vl_sizes.SPECIAL_IDS, mask_token_id=qwen3_vl_sizes.MASK_TOKEN_ID)
#: the wall-clock budget of a full run on one H100 / H200
BUDGET_S = 8 * 60

#: the full check on a GPU, and the dry run on a CPU (no warm-up there: it checks the code, its times are not figures)
#: ``compiled_*``: the decoder eager vs ``compile=True`` (CUDA graphs) on a stand-in of that depth (a third of 4B's
#: text layers on the GPU, to keep the compile within the budget; the dry run uses the tiny test sizes)
FULL = dict(text_layers=36, vision_layers=24, length=1024, prompt_len=2048, decode_reps=20, decode_warmup=3,
            step_reps=2, step_warmup=1, compiled_size="4b", compiled_layers=12, compiled_repeats=3)
DRY = dict(text_layers=1, vision_layers=1, length=256, prompt_len=64, decode_reps=1, decode_warmup=0,
           step_reps=1, step_warmup=0, freeze_embedding=True, compiled_size="tiny", compiled_layers=1,
           compiled_repeats=1)


def stand_in_config(text_layers: int, vision_layers: int):
    """A :class:`BardVLConfig` with Qwen3-VL-4B's widths, vocabulary and special ids, at the given depths."""
    return qwen3_vl_sizes.bard_vl_config("4b", text_layers, vision_layers, block_size=bench_training_step.BLOCK)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset (CUDA), else the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _train_step(name: str, model, optimizer, loss_fn: Callable[[], Any], device: torch.device, reps: int,
                warmup: int) -> dict:
    """``reps`` timed optimizer steps of ``loss_fn`` after ``warmup`` untimed ones: median seconds, peak memory,
    losses."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    times, losses = [], []
    _reset_peak(device)
    for i in range(warmup + reps):
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = loss_fn()
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    times.sort()
    return {"step": name, "seconds": times[len(times) // 2], "peak_memory_gib": round(_peak_gib(device), 3),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "host peak RSS",
            "losses": losses, "finite": all(math.isfinite(x) for x in losses)}


def make_optimizer(model, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with fp32 states (the recipes' optimizer) when the card holds it next to the fp32 weights, their
    gradients, the bf16 copies autocast keeps for backward and ~12 GiB of activations; plain SGD (no state) when it
    does not: on one GPU a 4B model's AdamW state alone is 33 GiB, which the recipes shard over their GPUs with
    FSDP2. The returned note says which one and why (it goes into the JSON)."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        need = params * (4 + 4 + 8 + 2) + 12 * 2**30
        total = torch.cuda.get_device_properties(device).total_memory
        if need > total:
            return torch.optim.SGD(trained, lr=1e-5), (
                f"SGD without state: AdamW would need about {need / 2**30:.0f} GiB on one card of "
                f"{total / 2**30:.0f} GiB (the recipes shard its state with FSDP2)")
    # fused: no foreach temporaries the size of the model (CPU and CUDA)
    return torch.optim.AdamW(trained, lr=1e-5, fused=True), "AdamW (fp32 states, fused)"


def check_training(device: torch.device, settings: dict, result: dict) -> None:
    """One PBM and one SWD step of the stand-in (fp32 master weights, :func:`make_optimizer`'s optimizer, bf16
    autocast on CUDA)."""
    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.objectives.block_diffusion import diffusion_training_loss
    from nemo_automodel_bard.objectives.distillation import swd_training_loss

    config = stand_in_config(settings["text_layers"], settings["vision_layers"])
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = BardVLForConditionalGeneration(config).float().train()
    result["params"] = sum(p.numel() for p in model.parameters())
    result["build_seconds"] = time.perf_counter() - started
    if settings.get("freeze_embedding"):  # dry run: no gradient or AdamW state for the 389 M-entry tied embedding
        model.get_input_embeddings().weight.requires_grad_(False)
    result["trained_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer, optimizer_note = make_optimizer(model, device)
    batch = _to(bench_training_step.build_batch(settings["length"]), device)
    common = {"length": settings["length"], "block_size": bench_training_step.BLOCK, "rows": 1,
              "optimizer": optimizer_note, "precision": "fp32 master weights, bf16 autocast"
              if device.type == "cuda" else "fp32"}
    pbm = _train_step("pbm", model, optimizer, lambda: diffusion_training_loss(model, batch, attention="dense"),
                      device, settings["step_reps"], settings["step_warmup"])
    result["pbm_step"] = {**common, **pbm}
    swd = _train_step("swd", model, optimizer, lambda: swd_training_loss(
        model, model, batch, teacher_block_size=4, top_k=16, attention="dense", teacher_attention="dense"),
        device, settings["step_reps"], settings["step_warmup"])
    result["swd_step"] = {**common, **swd, "teacher": "the student's weights at block size 4 (top-16 forward KD)"}
    del model, optimizer, batch
    _reset_peak(device)


def check_decode(device: torch.device, settings: dict, result: dict) -> None:
    """Per-forward cost of an AR step (1 token) against block steps (B = 16, 32) over the same cached prompt."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, lm_head = gpu_forward_cost.build(device, num_layers=settings["text_layers"], dtype=dtype)
    reps, warmup = settings["decode_reps"], settings["decode_warmup"]
    prompt = settings["prompt_len"]
    ms = {q: 1e3 * gpu_forward_cost.time_forward(model, lm_head, prompt, q, reps, device, warmup=warmup)
          for q in (1, 16, 32)}
    result["decode"] = {
        "prompt_len": prompt, "dtype": str(dtype).replace("torch.", ""), "mode": "eager", "batch": 1,
        "ar_step_ms": ms[1], "b16_step_ms": ms[16], "b32_step_ms": ms[32],
        "b16_over_ar": ms[16] / ms[1], "b32_over_ar": ms[32] / ms[1],
        # the tokens/s bound of a block step that commits k tokens per forward, next to AR's one per forward
        "ar_tokens_per_s": 1e3 / ms[1], "b32_tokens_per_s_at": {str(k): 1e3 * k / ms[32] for k in (4, 8, 16, 32)},
    }
    del model, lm_head
    _reset_peak(device)


def check_compiled_decode(device: torch.device, settings: dict, result: dict) -> None:
    """The decoder itself, eager vs ``compile=True`` (static KV cache, compiled step; CUDA graphs on a GPU): ms per
    forward of the AR step and of the B = 16 / B = 32 steps at batch 1 (``benchmarks/bench_compiled.py``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = bench_compiled.standin_model(settings["compiled_layers"], device, dtype, size=settings["compiled_size"])
    rows = bench_compiled.standin_rows(model, settings["compiled_repeats"])
    result["compiled_decode"] = {
        "size": settings["compiled_size"], "text_layers": settings["compiled_layers"],
        "dtype": str(dtype).replace("torch.", ""), "batch": 1,
        "rows": [{"step": r["label"], "identical": r["identical"], "warmup_compiled_s": r["warmup_compiled_s"],
                  **{f"{k}_ms": v for k, v in r["ms_per_forward"].items()}} for r in rows]}
    del model
    _reset_peak(device)


def check_serve(device: torch.device, result: dict) -> None:
    """One chat request to ``bard-vl serve``'s server (in this process, loopback) with a tiny random checkpoint."""
    import urllib.request

    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint
    from nemo_automodel_bard.serving.prompt import load_for_inference
    from nemo_automodel_bard.serving.server import BardServer, ServeConfig

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, block_size=4)
        model, processor = load_for_inference(model_dir, device=str(device))
        server = BardServer(model, processor, ServeConfig(model_name="gpu-check", max_batch=4))
        base, stop = server.start_background()
        try:
            body = json.dumps({"model": "gpu-check", "max_tokens": 16, "block_size": 4,
                               "messages": [{"role": "user", "content": "Describe a red circle."}]}).encode()
            request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                reply = json.loads(response.read())
            seconds = time.perf_counter() - started
        finally:
            stop()
    tokens = int(reply["usage"]["completion_tokens"])
    result["serve"] = {"model": "tiny random Bard-VL checkpoint", "seconds": seconds, "completion_tokens": tokens,
                       "finish_reason": reply["choices"][0]["finish_reason"], "ok": tokens > 0}


def summary(result: dict) -> str:
    """The Markdown summary of a result."""
    lines = [f"# GPU check ({result['mode']})", "",
             f"Device: {result['device']}; torch {result['torch']}; {result['seconds']:.0f} s in all "
             f"(budget {BUDGET_S} s). Stand-in: Qwen3-VL-4B widths, vocabulary 151,936, "
             f"{result['settings']['text_layers']} text / {result['settings']['vision_layers']} vision layers, "
             f"{result.get('params', 0) / 1e9:.2f} B parameters, random weights.", "",
             "| check | result |", "|---|---|"]
    for name in ("pbm_step", "swd_step"):
        r = result.get(name)
        if r:
            lines.append(f"| {name.replace('_', ' ').upper()} (row {r['length']}, B={r['block_size']}, {r['precision']}) | "
                         f"{r['seconds']:.3f} s, peak {r['peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']}), "
                         f"loss {r['losses'][-1]:.3f} |")
    d = result.get("decode")
    if d:
        lines.append(f"| decode forward, prompt {d['prompt_len']} ({d['dtype']}, {d['mode']}) | AR 1 token "
                     f"{d['ar_step_ms']:.2f} ms, B=16 {d['b16_step_ms']:.2f} ms ({d['b16_over_ar']:.2f}x), B=32 "
                     f"{d['b32_step_ms']:.2f} ms ({d['b32_over_ar']:.2f}x) |")
    c = result.get("compiled_decode")
    if c:
        for r in c["rows"]:
            lines.append(f"| {r['step']}, {c['size']} x {c['text_layers']} layers ({c['dtype']}), eager -> compiled | "
                         f"{r['eager_median_ms']:.2f} -> {r['compiled_median_ms']:.2f} ms/forward (compile "
                         f"{r['warmup_compiled_s']:.0f} s), identical tokens: {'yes' if r['identical'] else 'NO'} |")
    s = result.get("serve")
    if s:
        lines.append(f"| serving smoke ({s['model']}) | {s['completion_tokens']} tokens in {s['seconds']:.2f} s |")
    lines += ["", "Checks: " + ", ".join(f"{c['name']} {'ok' if c['ok'] else 'FAILED'}" for c in result["checks"]),
              "", f"Passed: {'yes' if result['passed'] else 'NO'}"]
    for name, error in result.get("errors", {}).items():
        lines.append(f"\n{name} failed: `{error.splitlines()[-1]}`")
    return "\n".join(lines) + "\n"


def run(dry_run: bool, out: Path, threads: int | None = None) -> dict:
    """Run every check, write ``gpu_check.json`` and ``gpu_check.md`` into ``out``; return the result."""
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run for the CPU check of the script itself)")
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu" if dry_run else "cuda")
    settings = DRY if dry_run else FULL
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": "dry-run" if dry_run else "gpu", "settings": settings, "budget_s": BUDGET_S,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.machine()}, "
        f"{torch.get_num_threads()} threads)", "torch": torch.__version__,
        "config": {"text": QWEN3_VL_4B_TEXT, "vision": QWEN3_VL_4B_VISION, **SPECIAL_IDS}, "errors": {}}
    for name, check in (("training", lambda: check_training(device, settings, result)),
                        ("decode", lambda: check_decode(device, settings, result)),
                        ("compiled_decode", lambda: check_compiled_decode(device, settings, result)),
                        ("serve", lambda: check_serve(device, result))):
        part_started = time.perf_counter()
        try:
            check()
        except Exception:  # noqa: BLE001 - a failed check is reported in the JSON, the next one still runs
            result["errors"][name] = traceback.format_exc()
            print(f"gpu_check: {name} failed:\n{result['errors'][name]}", file=sys.stderr, flush=True)
        result.setdefault("part_seconds", {})[name] = time.perf_counter() - part_started
    result["seconds"] = time.perf_counter() - started
    result["checks"] = [
        {"name": "pbm step", "ok": bool(result.get("pbm_step", {}).get("finite"))},
        {"name": "swd step", "ok": bool(result.get("swd_step", {}).get("finite"))},
        {"name": "decode", "ok": "decode" in result and all(
            result["decode"][k] > 0 for k in ("ar_step_ms", "b16_step_ms", "b32_step_ms"))},
        {"name": "compiled decode", "ok": "compiled_decode" in result and all(
            r["identical"] for r in result["compiled_decode"]["rows"])},
        {"name": "serve", "ok": bool(result.get("serve", {}).get("ok"))},
        {"name": f"within {BUDGET_S} s", "ok": dry_run or result["seconds"] <= BUDGET_S},
    ]
    result["passed"] = all(c["ok"] for c in result["checks"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(summary(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, one text and one vision layer, short rows")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where the JSON and Markdown go")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU check of the script itself)", file=sys.stderr)
        return 2
    result = run(args.dry_run, args.out, args.threads)
    print(summary(result))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

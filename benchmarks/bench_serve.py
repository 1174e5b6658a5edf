"""Loopback benchmark of ``bard-vl serve``: throughput and latency with continuous batching vs one at a time.

Starts the server in this process on 127.0.0.1 (a free port), with a tiny random Bard-VL (``bard-vl tiny``)
unless ``--model DIR`` is given, and sends the same requests with the official ``openai`` client at
concurrency 1, 4 and 16 to two servers: one with continuous batching (``--max-batch 16``) and one that decodes
one request at a time (``max_batch=1``; the others wait in its queue). Every request asks for the same number
of tokens (a random model never emits EOS, so each one decodes exactly ``--max-tokens`` tokens).

    python benchmarks/bench_serve.py [--requests 32] [--max-tokens 32] [--out docs/benchmarks/serve.md]

Bounded: ``--requests`` per setting (default 32), loopback only.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _serve(model, processor, max_batch: int):
    from nemo_automodel_bard.serving.server import BardServer, ServeConfig

    server = BardServer(model, processor, ServeConfig(model_name="bench", max_batch=max_batch, max_queue=1024))
    base, stop = server.start_background()
    return base + "/v1", stop


def _run(base: str, prompts: list[str], concurrency: int, max_tokens: int, block_size: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

    def ask(prompt: str) -> tuple[float, int, float]:
        started = time.perf_counter()
        reply = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, extra_body={"block_size": block_size})
        return time.perf_counter() - started, reply.usage.completion_tokens, reply.usage.model_extra["bard"]["mean_batch_size"]

    ask(prompts[0])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, prompts))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "requests_per_s": len(prompts) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": _percentile(latencies, 99),
        "mean_batch": statistics.mean(r[2] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: a tiny random one)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from nemo_automodel_bard.serving.prompt import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

            model_dir = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, block_size=args.block_size)
        model, processor = load_for_inference(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        words = ["red", "blue", "green", "circle", "square", "triangle", "row", "column"]
        prompts = [f"Describe {' '.join(words[(i + k) % 8] for k in range(1 + i % 5))} please." for i in range(args.requests)]
        rows = []
        for label, max_batch in (("continuous batching (max 16)", 16), ("one at a time", 1)):
            base, stop = _serve(model, processor, max_batch)
            try:
                for c in args.concurrency:
                    result = _run(base, prompts, c, args.max_tokens, args.block_size)
                    rows.append((label, c, result))
                    print(f"{label:30s} c={c:3d}  {result['requests_per_s']:6.2f} req/s  {result['tokens_per_s']:7.1f} tok/s  "
                          f"p50 {result['p50_s']:.3f} s  p99 {result['p99_s']:.3f} s  mean batch {result['mean_batch']:.1f}",
                          flush=True)
            finally:
                stop()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    lines = [
        f"Machine: {device}, {torch.get_num_threads()} torch thread(s) for the server, Python {platform.python_version()}, "
        f"torch {torch.__version__}. Model: {'tiny random Bard-VL' if args.model is None else args.model}. "
        f"{args.requests} requests per row, {args.max_tokens} tokens each, block size {args.block_size}, greedy.",
        "",
        "| server | concurrency | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, c, r in rows:
        lines.append(f"| {label} | {c} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | "
                     f"{r['p99_s']:.3f} | {r['mean_batch']:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

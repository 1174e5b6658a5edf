"""Loopback load test of ``bard-vl serve`` against an autoregressive server, and a fairness probe.

Two measurements, both on 127.0.0.1 only, bounded in requests and time:

* ``load``: the same text requests, sent with the official ``openai`` client at concurrency 1, 4 and 16 (one
  round of ``--requests`` per level, after a warm-up request), to ``bard-vl serve`` (started in this process)
  and to ``transformers serve`` (a subprocess) serving the same network as a plain Qwen3-VL model decoded
  autoregressively (``--ar-dir``, written from the Bard-VL checkpoint by :func:`write_ar_copy`). Reports
  requests/s, completion tokens/s (the tokens each server says it produced) and p50/p99 latency per request.
* ``fairness``: how long a small request takes alone and while one request with a long block (``--big-block``
  positions, as many denoising steps, static rule: one forward per position) is decoding on the same server.

    python benchmarks/serve_load.py load --model DIR [--requests 32] [--max-tokens 32] [--out docs/benchmarks/serve_load.json]
    python benchmarks/serve_load.py fairness --model DIR [--big-block 256]

``DIR`` defaults to a fresh ``bard-vl tiny`` checkpoint (random weights: neither server stops at an EOS it never
draws, so every request decodes ``--max-tokens`` tokens on both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

PROMPTS = ["How many shapes are there?", "What colour is the circle?", "Describe the picture.",
           "Is there a square on the left?"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ar_copy(bard_dir: Path, out: Path) -> Path:
    """The Bard-VL checkpoint as a plain Qwen3-VL directory (same weights, the AR model's config and processor
    class), which ``transformers serve`` loads and decodes autoregressively."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bard_dir, out)
    config = json.loads((out / "config.json").read_text())
    for key in ("block_size", "mask_token_id", "pad_block_token_id", "legacy_clean_sees_noisy", "auto_map"):
        config.pop(key, None)
    config["model_type"], config["architectures"] = "qwen3_vl", ["Qwen3VLForConditionalGeneration"]
    config["text_config"]["model_type"] = "qwen3_vl_text"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out / name
        data = json.loads(path.read_text())
        if data.get("processor_class") == "BardVLProcessor":
            data["processor_class"] = "Qwen3VLProcessor"
        path.write_text(json.dumps(data, indent=2))
    generation = out / "generation_config.json"
    if generation.exists():
        data = {k: v for k, v in json.loads(generation.read_text()).items()
                if k not in ("block_size", "denoising_steps", "remasking_strategy", "confidence_threshold", "mask_token_id")}
        data["do_sample"] = False
        generation.write_text(json.dumps(data, indent=2))
    return out


def _bard_server(model_dir: Path, max_batch: int):
    from nemo_automodel_bard.serving.prompt import load_for_inference
    from nemo_automodel_bard.serving.server import BardServer, ServeConfig

    model, processor = load_for_inference(model_dir, device="cpu")
    server = BardServer(model, processor, ServeConfig(model_name="bench", max_batch=max_batch, max_queue=1024))
    base, stop = server.start_background()
    return base + "/v1", "bench", stop


def _ar_server(ar_dir: Path, continuous: bool, threads: int, python: str):
    import httpx

    port = _free_port()
    launcher = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    command = [python, "-c", launcher, "serve", str(ar_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
               "--continuous-batching" if continuous else "--no-continuous-batching"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"transformers serve exited with {process.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            process.kill()
            raise RuntimeError("transformers serve did not start within 180 s")
        time.sleep(0.5)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

    return f"http://127.0.0.1:{port}/v1", str(ar_dir), stop


def _round(base: str, model: str, concurrency: int, requests: int, max_tokens: int, extra: dict) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

    def ask(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=max_tokens,
            temperature=0.0, extra_body=extra or None)
        return time.perf_counter() - started, int(reply.usage.completion_tokens)

    ask(0)  # warm-up
    return timed_round(ask, concurrency, requests)[0]


def timed_round(ask: Callable[[int], tuple], concurrency: int, requests: int) -> tuple[dict, list[tuple]]:
    """``requests`` calls ``ask(i)`` (each returning ``(seconds, completion tokens, ...)``) from ``concurrency``
    threads: ``(throughput and latency figures, every call's result)``."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, range(requests)))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return ({"concurrency": concurrency, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
             "tokens": tokens, "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
             "p99_s": _percentile(latencies, 99)}, results)


def load(args: argparse.Namespace) -> list[dict]:
    rows = []
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = []
    if args.only in (None, "bard"):
        extra = {"block_size": args.block_size, "denoising_steps": args.block_size}
        if args.threshold is not None:
            extra["confidence_threshold"] = args.threshold
        servers.append((f"bard-vl serve B={args.block_size} threshold={args.threshold}",
                        lambda: _bard_server(args.model, 16), extra))
    if args.only in (None, "ar"):
        ar_dir = write_ar_copy(args.model, Path(tempfile.mkdtemp()) / "ar")
        servers.append(("transformers serve (AR)", lambda: _ar_server(ar_dir, args.ar_continuous, args.threads, args.ar_python),
                        {}))
    for name, start, extra in servers:
        base, model, stop = start()
        try:
            for concurrency in levels:
                row = _round(base, model, concurrency, args.requests, args.max_tokens, extra)
                row["server"] = name
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop()
    return rows


def fairness(args: argparse.Namespace) -> dict:
    import openai

    base, model, stop = _bard_server(args.model, 16)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=900)

    def small() -> float:
        started = time.perf_counter()
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=8, extra_body={"block_size": 4})
        return time.perf_counter() - started

    try:
        small()  # warm-up
        alone = statistics.median(small() for _ in range(5))
        big_done = {}

        def big() -> None:
            started = time.perf_counter()
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=args.big_block,
                extra_body={"block_size": args.big_block, "denoising_steps": args.big_block,
                            "remasking_strategy": "low_confidence_static"})
            big_done["s"] = time.perf_counter() - started

        thread = threading.Thread(target=big)
        thread.start()
        time.sleep(args.head_start)
        during = small()
        thread.join()
    finally:
        stop()
    row = {"small_alone_s": alone, "small_during_big_s": during, "big_s": big_done.get("s"),
           "big_block": args.big_block}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("load", "fairness"))
    parser.add_argument("--model", type=Path, default=None, help="a Bard-VL directory (default: a fresh tiny one)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=None, help="confidence_threshold of the Bard requests")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--only", choices=("bard", "ar"), default=None,
                        help="one server only (with ar, this process does not import torch: give --model)")
    parser.add_argument("--ar-continuous", action="store_true", help="transformers serve --continuous-batching")
    parser.add_argument("--ar-python", default=sys.executable,
                        help="the Python that runs transformers serve (it needs accelerate installed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--big-block", type=int, default=256)
    parser.add_argument("--head-start", type=float, default=1.0, help="seconds the big request runs before the small one")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.only != "ar":
        import torch

        torch.set_num_threads(args.threads)
    if args.model is None:
        from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint

        args.model = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "bard-vl-tiny", seed=0, block_size=4)
    result = load(args) if args.mode == "load" else fairness(args)
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, "
                                                   f"{os.cpu_count()} CPUs, torch threads {args.threads}",
                                        "args": {k: str(v) for k, v in vars(args).items()}, "result": result},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

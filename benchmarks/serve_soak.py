"""Soak test of ``bard-vl serve``: mixed traffic on 127.0.0.1 for a bounded time, checking every answer.

Each of ``--concurrency`` client threads sends requests in a loop until ``--seconds`` have passed. The traffic
mixes valid text and image requests with varied decoding options (streaming and not; images inline and from the
media root), clients that go away mid-answer (a stream closed after its first chunk, a non-streaming request
given up after 50 ms), malformed bodies, oversized images and bad option values. It counts:

* responses with status >= 500 (must be 0) and valid requests that did not answer within the client timeout
  (hung, must be 0);
* valid greedy answers that differ from ``model.generate`` for the same prompt and options (must be 0);
* 4xx answers to the bad requests (each kind must get its own 4xx);
* the server process's resident memory after a warm-up and at the end.

    python benchmarks/serve_soak.py --seconds 300 --concurrency 64 [--model DIR] [--out docs/benchmarks/serve_soak.json]

Without ``--model`` it trains the tests' toy checkpoint for a few seconds (a random model never stops, and its
answers would not show whether batching changed them). ``run_soak`` is also what the test suite runs briefly.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

#: decoding options of the valid requests (each is a cohort of its own)
VARIANTS = (
    {"block_size": 4, "denoising_steps": 4},
    {"block_size": 2, "denoising_steps": 2, "confidence_threshold": 0.5},
    {"block_size": 8, "denoising_steps": 8, "remasking_strategy": "low_confidence_static"},
    {"block_size": 4, "denoising_steps": 2, "remasking_strategy": "low_confidence_budget", "confidence_threshold": 0.8},
)
MAX_TOKENS = 40


def rss_mib() -> float:
    """Resident memory of this process (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def data_url(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_soak(base: str, model_name: str, pairs: list[tuple[str, Any]], expected: Callable[[int, int], str],
             *, seconds: float, concurrency: int, media_file: str | None = None, oversized: Any = None,
             timeout: float = 120.0, rss: Callable[[], float] | None = None) -> dict[str, Any]:
    """Mixed traffic against a running server; returns the counts (see the module docstring).

    ``pairs``: (question, PIL image or None) per prompt; ``expected(pair, variant)``: the text ``generate`` gives;
    ``media_file``: the first prompt's image as a path below the server's media root (some requests use it).
    """
    import httpx

    url = base + "/v1/chat/completions"
    lock = threading.Lock()
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    inline = {i: data_url(image) for i, (_, image) in enumerate(pairs) if image is not None}

    def messages(i: int, from_root: bool = False) -> list[dict]:
        question, image = pairs[i]
        content: list[dict] = []
        if image is not None:
            use_file = from_root and media_file and i == 0  # the media root holds the first prompt's image
            content.append({"type": "image_url", "image_url": {"url": media_file if use_file else inline[i]}})
        content.append({"type": "text", "text": question})
        return [{"role": "user", "content": content}]

    def note(kind: str, status: int, problem: str | None = None) -> None:
        with lock:
            counts[f"{kind}:{status}"] += 1
            if status >= 500:
                counts["5xx"] += 1
            if problem:
                problems.append(problem)

    def valid(client: httpx.Client, n: int) -> None:
        i, v = n % len(pairs), (n // len(pairs)) % len(VARIANTS)
        body = {"model": model_name, "messages": messages(i, from_root=(n % 7 == 0)), "max_tokens": MAX_TOKENS,
                **VARIANTS[v]}
        stream = n % 2 == 1
        try:
            if stream:
                text, status = "", 200
                with client.stream("POST", url, json=dict(body, stream=True), timeout=timeout) as response:
                    status = response.status_code
                    for line in response.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            event = json.loads(line[6:])
                            if "error" in event:
                                status = 500
                            for choice in event.get("choices", []):
                                text += choice["delta"].get("content") or ""
            else:
                response = client.post(url, json=body, timeout=timeout)
                status = response.status_code
                text = response.json()["choices"][0]["message"]["content"] if status == 200 else ""
        except httpx.TimeoutException:
            note("valid", 0, f"hung: pair {i} variant {v} stream={stream}")
            with lock:
                counts["hung"] += 1
            return
        wrong = status == 200 and text != expected(i, v)
        note("valid", status, f"pair {i} variant {v} stream={stream}: {text!r}" if wrong else
             (f"pair {i} variant {v}: status {status}" if status != 200 else None))
        if wrong:
            with lock:
                counts["mismatch"] += 1
        with lock:
            counts["answered"] += status == 200

    def gone(client: httpx.Client, n: int) -> None:
        body = {"model": model_name, "messages": messages(n % len(pairs)), "max_tokens": MAX_TOKENS, **VARIANTS[0]}
        try:
            if (n // 10) % 2:
                with client.stream("POST", url, json=dict(body, stream=True), timeout=timeout) as response:
                    for _ in response.iter_lines():
                        break  # the client goes away after the first chunk
                note("disconnect", response.status_code)
            else:
                response = client.post(url, json=body, timeout=0.05)  # usually given up before the answer
                note("disconnect", response.status_code)
        except httpx.TimeoutException:
            note("disconnect", 0)  # the client went away

    def bad(client: httpx.Client, n: int) -> None:
        kind = n % 3
        if kind == 0:
            response = client.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=timeout)
            want = 400
        elif kind == 1 and oversized is not None:
            body = {"model": model_name, "max_tokens": 4,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": oversized}},
                                                              {"type": "text", "text": "x"}]}]}
            response = client.post(url, json=body, timeout=timeout)
            want = 413
        else:
            body = {"model": model_name, "messages": messages(0), "block_size": 4096}
            response = client.post(url, json=body, timeout=timeout)
            want = 400
        note(f"bad{kind}", response.status_code,
             None if response.status_code in (want, 429) else f"bad kind {kind}: {response.status_code} (wanted {want})")

    def worker(w: int) -> None:
        deadline = time.perf_counter() + seconds
        n = w
        with httpx.Client() as client:
            while time.perf_counter() < deadline:
                choice = n % 10
                if choice < 7:
                    valid(client, n)
                elif choice == 7:
                    gone(client, n)
                else:
                    bad(client, n)
                n += concurrency

    started = time.perf_counter()
    rss_start = rss() if rss else None
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return {"seconds": time.perf_counter() - started, "concurrency": concurrency, "counts": dict(counts),
            "problems": problems[:20], "rss_start_mib": rss_start, "rss_end_mib": rss() if rss else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=20, help="seconds of the same traffic before measuring memory")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import TOY_PAIRS, toy_picture  # noqa: E402 - the tests' toy task

    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint
    from nemo_automodel_bard.fixtures.toy import make_example, train_toy
    from nemo_automodel_bard.serving.prompt import encode_messages, load_for_inference
    from nemo_automodel_bard.serving.server import BardServer, ServeConfig

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    model_dir = write_tiny_checkpoint(work / "toy", seed=0, block_size=4)
    model, processor = load_for_inference(model_dir, device="cpu")
    examples = [make_example(processor, p, a, image=toy_picture(*pic) if pic else None) for p, a, pic in TOY_PAIRS]
    model.train()
    train_toy(model, examples, steps=100, lr=3e-3, copies=8, seed=0)
    model.eval()
    pairs = [(p, toy_picture(*pic) if pic else None) for p, _, pic in TOY_PAIRS]
    answers = {}
    for i, (question, image) in enumerate(pairs):
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
        inputs = encode_messages(processor, [{"role": "user", "content": content}])
        for v, variant in enumerate(VARIANTS):
            ids = model.generate(inputs, max_new_tokens=MAX_TOKENS, **variant)
            answers[i, v] = processor.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    media = work / "media"
    media.mkdir()
    pairs[0][1].save(media / "first.png")
    server = BardServer(model, processor, ServeConfig(model_name="soak", media_root=media, max_tokens_limit=64,
                                                      max_image_pixels=256 * 256, max_queue=256))
    base, stop = server.start_background()
    oversized = data_url(Image.new("RGB", (300, 300), (1, 2, 3)))
    kwargs = dict(media_file="first.png", oversized=oversized, rss=rss_mib)
    try:
        warm = run_soak(base, "soak", pairs, lambda i, v: answers[i, v], seconds=args.warmup,
                        concurrency=args.concurrency, **kwargs)
        result = run_soak(base, "soak", pairs, lambda i, v: answers[i, v], seconds=args.seconds,
                          concurrency=args.concurrency, **kwargs)
    finally:
        stop()
    result["warmup"] = warm["counts"]
    result["rss_growth"] = result["rss_end_mib"] / result["rss_start_mib"] - 1
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    ok = not result["counts"].get("5xx") and not result["counts"].get("hung") and not result["counts"].get("mismatch")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

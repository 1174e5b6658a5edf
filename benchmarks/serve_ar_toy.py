"""Serving throughput at equal accuracy on a toy task: ``bard-vl serve`` (B=32 and B=4) against ``transformers
serve`` (AR), both serving a model trained from the same tiny initial weights on the same three questions.

The repository's converted census models do not reach the AR parent's accuracy (docs/results.md), so the main
job cannot give an equal-accuracy comparison. This one does, on a toy task both models learn perfectly:

* the task: the tests' three toy questions (two about a picture, sent inline as PNG data URLs, one text-only),
  answers of a few words ending with EOS;
* the Bard-VL model: ``bard-vl tiny`` (seed 0) trained with the block-diffusion loss (``train_toy``, block sizes
  4/8/16/32) -- the tests' toy recipe with larger blocks;
* the AR model: the same initial weights written as a plain Qwen3-VL (``serve_load.write_ar_copy``) and trained
  with the next-token loss on the same questions for the same number of steps;
* both servers on 127.0.0.1, one at a time, torch limited to one thread each; ``--requests`` requests (the
  three questions in turn) at each concurrency, greedy, ``max_tokens`` 32; accuracy = answers equal to the
  reference; tokens/s counts the completion tokens each server reports.

    python benchmarks/serve_ar_toy.py --ar-python /path/to/python/with/accelerate/and/fastapi [--out FILE]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402  (write_ar_copy, the two server launchers, the timed round)


def toy_pairs() -> list[tuple[str, str, object]]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from helpers import TOY_PAIRS, toy_picture
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return [(p, a, toy_picture(*pic) if pic else None) for p, a, pic in TOY_PAIRS]


def build_models(work: Path, steps: int) -> tuple[Path, Path]:
    """``(bard_dir, ar_dir)``: both trained from the same ``bard-vl tiny`` weights on the toy questions."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from nemo_automodel_bard import BardVLForConditionalGeneration
    from nemo_automodel_bard.fixtures.tiny import write_tiny_checkpoint
    from nemo_automodel_bard.fixtures.toy import make_example, train_toy

    init = write_tiny_checkpoint(work / "init", seed=0, block_size=32)
    ar_dir = serve_load.write_ar_copy(init, work / "ar")
    processor = AutoProcessor.from_pretrained(init)
    examples = [make_example(processor, p, a, image=im) for p, a, im in toy_pairs()]

    bard = BardVLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    losses = train_toy(bard, examples, block_sizes=(4, 8, 16, 32), steps=steps, lr=3e-3, copies=8, seed=0)
    bard_dir = work / "bard"
    import shutil

    shutil.copytree(init, bard_dir)
    bard.save_pretrained(bard_dir)
    print(f"bard: last losses {[round(x, 3) for x in losses[-3:]]}", flush=True)

    ar = Qwen3VLForConditionalGeneration.from_pretrained(ar_dir, dtype=torch.float32)
    optim = torch.optim.AdamW(ar.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 10))
    ar.train()
    for step in range(steps):
        ex = examples[step % len(examples)]
        row = {k: v for k, v in ex.inputs.items() if isinstance(v, torch.Tensor)}
        ids = torch.cat([row["input_ids"][0], ex.response])[None]
        row["input_ids"] = ids
        row["attention_mask"] = torch.ones_like(ids)
        if "mm_token_type_ids" in row:
            row["mm_token_type_ids"] = torch.cat([row["mm_token_type_ids"][0], ex.response.new_zeros(len(ex.response))])[None]
        labels = ids.clone()
        labels[:, : ids.shape[1] - len(ex.response)] = -100
        loss = ar(**row, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ar.parameters(), 1.0)
        optim.step()
        sched.step()
    print(f"ar: last loss {float(loss):.3f}", flush=True)
    ar.eval()
    ar.save_pretrained(ar_dir)
    return bard_dir, ar_dir


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _round(base: str, model: str, concurrency: int, requests: int, extra: dict, pairs: list) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

    def ask(i: int) -> tuple[float, int, bool]:
        prompt, answer, image = pairs[i % len(pairs)]
        content = ([{"type": "image_url", "image_url": {"url": _data_url(image)}}] if image is not None else [])
        content.append({"type": "text", "text": prompt})
        started = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=32, temperature=0.0, extra_body=extra or None)
        text = (reply.choices[0].message.content or "").strip()
        return time.perf_counter() - started, int(reply.usage.completion_tokens), text == answer

    for i in range(len(pairs)):  # warm-up, one of each
        ask(i)
    row, results = serve_load.timed_round(ask, concurrency, requests)
    return dict(row, accuracy=sum(r[2] for r in results) / requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ar-python", required=True, help="the Python that runs transformers serve (accelerate, fastapi)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=400, help="training steps of each model (150: an unconfident Bard-VL)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="serve-ar-toy-"))
    work.mkdir(parents=True, exist_ok=True)
    bard_dir, ar_dir = build_models(work, args.steps)
    pairs = toy_pairs()
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = [
        ("transformers serve (AR)", lambda: serve_load._ar_server(ar_dir, False, 1, args.ar_python), {}),
        ("transformers serve (AR), --continuous-batching",
         lambda: serve_load._ar_server(ar_dir, True, 1, args.ar_python), {}),
        ("bard-vl serve, B=32, threshold 0.9", lambda: serve_load._bard_server(bard_dir, 16),
         {"block_size": 32, "denoising_steps": 32, "confidence_threshold": 0.9}),
        ("bard-vl serve, B=4, threshold 0.9", lambda: serve_load._bard_server(bard_dir, 16),
         {"block_size": 4, "denoising_steps": 4, "confidence_threshold": 0.9}),
    ]
    rows = []
    for name, start, extra in servers:
        base, model, stop = start()
        try:
            for concurrency in levels:
                row = _round(base, model, concurrency, args.requests, extra, pairs)
                row["server"] = name
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stop()
    forwards = tokens_per_forward(bard_dir, pairs)
    print(json.dumps({"bard_tokens_per_forward": forwards}), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                                                   "CPUs shared with other jobs, torch threads 1 per server",
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "bard_tokens_per_forward": forwards, "result": rows}, indent=2) + "\n")
    return 0


def tokens_per_forward(bard_dir: Path, pairs: list) -> dict:
    """Response tokens per denoising forward of each block size on the three questions (``generate``'s stats)."""
    from nemo_automodel_bard.serving.prompt import encode_messages, load_for_inference

    model, processor = load_for_inference(bard_dir, device="cpu")
    out = {}
    for block in (32, 4):
        tokens = forwards = 0
        for prompt, _, image in pairs:
            content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": prompt}]
            inputs = encode_messages(processor, [{"role": "user", "content": content}])
            _, stats = model.generate(inputs, max_new_tokens=32, block_size=block, denoising_steps=block,
                                      confidence_threshold=0.9, return_step_stats=True)
            tokens += int(stats["num_response_tokens"])
            forwards += int(stats["forwards_total"])
        out[f"B={block}"] = {"response_tokens": tokens, "forwards": forwards, "tokens_per_forward": tokens / forwards}
    return out


if __name__ == "__main__":
    sys.exit(main())

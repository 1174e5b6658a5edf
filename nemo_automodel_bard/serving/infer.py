"""``bard-vl infer MODEL_DIR [--image PATH ...] [--video PATH] --prompt TEXT``: answer once (or chat).

Each committed block is printed as soon as the decoder commits it; the step statistics follow on stderr.
Decoding options default to the checkpoint's generation config (``generation_config.json``), then
to the model's block size and the package defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from nemo_automodel_bard.decoding.schema import add_arguments, options_from_args

from .media import MediaLimits, RequestError, load_image, resolve_video
from .prompt import TextStream, encode_messages, load_for_inference


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """The Bard decoding flags of ``infer``: one per option of the decoding schema (``None`` = the checkpoint's
    default)."""
    add_arguments(parser)


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags that were given, parsed and checked by the decoding schema (``ValueError`` naming the flag)."""
    return options_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bard-vl infer",
        description="Answer a prompt about images or a video with a Bard-VL checkpoint, streaming block by block.",
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (repeatable)")
    parser.add_argument("--prompt", default=None, help="the question (required unless --chat)")
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.add_argument("--chat", action="store_true", help="interactive chat: one prompt per line, empty line or EOF ends")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--json", action="store_true", help="print the statistics as one JSON line on stderr")
    add_decoding_flags(parser)
    return parser


def _user_content(images: list[Any], videos: list[str], text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content += [{"type": "video", "video": video} for video in videos]
    content.append({"type": "text", "text": text})
    return content


def answer(model: Any, processor: Any, messages: list[dict[str, Any]], options: dict[str, Any], out: TextIO) -> tuple[str, dict]:
    """Decode one answer to ``messages``, writing each committed block's text to ``out``; return (text, stats)."""
    inputs = encode_messages(processor, messages)
    opts_max = options.get("max_new_tokens")
    stream = TextStream(processor.tokenizer)
    from nemo_automodel_bard.models.bard_vl.generation_bard_vl import resolve_generate_options

    resolved = resolve_generate_options(model, **options)
    eos = set(resolved.eos_token_ids)
    state = {"n": 0, "ended": False}
    limit = resolved.max_new_tokens if opts_max is None else opts_max

    def on_block(k: int, tokens: Any, finished: Any) -> None:
        if state["ended"]:
            return
        row = tokens[0].tolist()[: max(limit - state["n"], 0)]
        hit = next((i for i, t in enumerate(row) if t in eos), None)
        if hit is not None:
            row, state["ended"] = row[: hit + 1], True
        state["n"] += len(row)
        delta = stream.push(row)
        if delta:
            out.write(delta)
            out.flush()

    started = time.perf_counter()
    ids, stats = model.generate(inputs, return_step_stats=True, block_callback=on_block, **options)
    tail = stream.push([], final=True)
    if tail:
        out.write(tail)
    out.write("\n")
    out.flush()
    stats = {k: v for k, v in stats.items() if k != "trajectory"}
    stats["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    stats["wall_s"] = time.perf_counter() - started
    text = processor.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    return text, stats


def format_stats(stats: dict[str, Any]) -> str:
    return (
        f"-- {stats['num_response_tokens']} tokens in {stats['num_blocks']} blocks of {stats['block_size']}, "
        f"{stats['forwards_total']} forwards (prefill {stats['prefill_forwards']}, denoising {stats['denoising_forwards']}), "
        f"{stats['tokens_per_forward']:.2f} tokens/forward, {stats['tokens_per_second']:.1f} tokens/s; "
        f"steps per block {stats['block_step_counts']}; {stats['remasking_strategy']} "
        f"threshold {stats['confidence_threshold']}, {stats['denoising_steps']} denoising steps, "
        f"prompt {stats['prompt_tokens']} tokens"
    )


def main(argv: list[str], out: TextIO | None = None, err: TextIO | None = None, stdin: TextIO | None = None) -> int:
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    args = build_parser().parse_args(argv)
    if not args.chat and not args.prompt:
        print("bard-vl infer: give --prompt TEXT (or --chat)", file=err)
        return 2
    limits = MediaLimits(any_path=True)
    try:
        options = decoding_kwargs(args)  # refuse bad flags before loading anything
        images = [load_image(p, limits, param=f"--image {p}") for p in args.image]
        videos = [resolve_video(p, limits, param=f"--video {p}") for p in args.video]
        model, processor = load_for_inference(args.model_dir, args.device, args.dtype)
        from nemo_automodel_bard.models.bard_vl.generation_bard_vl import resolve_generate_options

        resolve_generate_options(model, **options)  # refuse bad flags before any work
    except (RequestError, FileNotFoundError, ValueError) as exc:
        print(f"bard-vl infer: {exc}", file=err)
        return 2
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})

    def turn(text: str, first: bool) -> None:
        content = _user_content(images, videos, text) if first else [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        reply, stats = answer(model, processor, messages, options, out)
        messages.append({"role": "assistant", "content": reply})
        print(json.dumps(stats) if args.json else format_stats(stats), file=err)
        err.flush()

    try:
        if args.prompt:
            turn(args.prompt, first=True)
        if args.chat:
            first = not args.prompt
            while True:
                out.write("> ")
                out.flush()
                line = stdin.readline()
                if not line or not line.strip() or line.strip() in ("/exit", "/quit"):
                    break
                turn(line.strip(), first)
                first = False
    except ValueError as exc:
        print(f"bard-vl infer: {exc}", file=err)
        return 2
    return 0


__all__ = ["add_decoding_flags", "answer", "build_parser", "decoding_kwargs", "format_stats", "main"]

"""Per-forward cost of a Qwen3-VL-4B-sized text tower on a GPU: 1 new token vs a 32-token block.

Block-diffusion decoding replaces one-token forwards by forwards over a whole block (B = 32) that
read the same KV cache. On a GPU at batch 1 both are memory-bound (the weights are read once per
forward), so a 32-token forward costs little more than a 1-token one; this script measures the
ratio and the tokens/s bound it implies for a given number of tokens committed per forward.

The model is transformers' Qwen3-VL text tower (the module Bard-VL's text tower *is*) at the 4B
sizes of Qwen3-VL-4B (hidden 2560, 36 layers, 32 heads, 8 KV heads, head_dim 128, MLP 9728,
vocabulary 151,936), random weights, bf16, SDPA with an explicit 4-D additive mask as Bard-VL uses,
logits for every query row (the decoder needs them for the whole block). Usage::

    python benchmarks/gpu_forward_cost.py --out results_dir

Writes ``gpu_forward_cost.json`` and ``gpu_forward_cost.md``. :func:`build` and :func:`time_forward` also serve
``benchmarks/gpu_check.py`` (any depth, dtype and device; on a CPU the timing is wall-clock).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def build(device: torch.device, num_layers: int = 36, dtype: torch.dtype = torch.bfloat16):
    """Qwen3-VL-4B's text tower (``num_layers`` of its 36 layers) and an untied ``lm_head``, random weights."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    from nemo_automodel_bard.models.qwen3_vl_sizes import text_config

    config = Qwen3VLTextConfig(**text_config("4b", num_layers))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3VLTextModel(config).to(dtype).eval()
        lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
    for layer in model.layers:
        layer.self_attn.is_causal = False
    return model, lm_head


@torch.no_grad()
def time_forward(model, lm_head, prompt_len: int, q_len: int, reps: int, device: torch.device,
                 warmup: int = 5) -> float:
    """Seconds per forward of ``q_len`` new tokens over a cached prompt of ``prompt_len`` (logits for every row)."""
    from transformers import DynamicCache

    dtype = lm_head.weight.dtype
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 150000, (1, prompt_len), device=device)
    pos = torch.arange(prompt_len, device=device).view(1, 1, -1).expand(3, 1, -1)
    model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
          attention_mask=torch.zeros(1, 1, prompt_len, prompt_len, dtype=dtype, device=device))
    q_ids = torch.randint(0, 150000, (1, q_len), device=device)
    q_pos = (prompt_len + torch.arange(q_len, device=device)).view(1, 1, -1).expand(3, 1, -1)
    mask = torch.zeros(1, 1, q_len, prompt_len + q_len, dtype=dtype, device=device)

    def step():
        out = model(input_ids=q_ids, position_ids=q_pos, past_key_values=cache, use_cache=True, attention_mask=mask)
        lm_head(out.last_hidden_state)
        cache.crop(-q_len)

    for _ in range(warmup):
        step()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - started) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    device = torch.device("cuda")
    started = time.time()
    model, lm_head = build(device)
    params = sum(p.numel() for p in model.parameters()) + lm_head.weight.numel()
    rows = []
    for prompt_len in (512, 2048):
        t1 = time_forward(model, lm_head, prompt_len, 1, args.reps, device)
        t32 = time_forward(model, lm_head, prompt_len, 32, args.reps, device)
        rows.append({"prompt_len": prompt_len, "t_1_token_ms": 1e3 * t1, "t_32_block_ms": 1e3 * t32,
                     "ratio": t32 / t1, "ar_tokens_per_s": 1 / t1,
                     "block_tokens_per_s": {str(f): f / t32 for f in (4, 6, 10, 14, 32)}})
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "params": params,
              "dtype": "bfloat16", "batch": 1, "rows": rows, "seconds": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_forward_cost.json").write_text(json.dumps(result, indent=2))
    lines = [f"Device: {result['device']}, torch {result['torch']}, {params / 1e9:.2f} B parameters "
             "(text tower + lm_head), bf16, batch 1, SDPA with a 4-D additive mask, logits for every query row.", "",
             "| prompt (cached) | 1-token forward (ms) | 32-token forward (ms) | ratio | AR tokens/s bound | "
             "block tokens/s at 6 / 10 / 14 / 32 tokens per forward |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = r["block_tokens_per_s"]
        lines.append(f"| {r['prompt_len']} | {r['t_1_token_ms']:.2f} | {r['t_32_block_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['ar_tokens_per_s']:.0f} | {b['6']:.0f} / {b['10']:.0f} / {b['14']:.0f} / {b['32']:.0f} |")
    (args.out / "gpu_forward_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

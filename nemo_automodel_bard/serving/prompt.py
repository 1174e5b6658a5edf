"""Loading a checkpoint for inference, incremental detokenisation, and (re-exported from
:mod:`nemo_automodel_bard.data.chat_inputs`) chat messages -> processor inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the one path from a chat to model inputs (shared with the evaluation and the collators' prompt part)
from nemo_automodel_bard.data.chat_inputs import ChatInputError, encode_chats, encode_messages


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(model_dir: str | Path, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of a local Bard-VL directory, ready to decode.

    Weights are read from safetensors only (no pickle) and no code from the checkpoint is run. The model
    uses SDPA attention; ``dtype`` defaults to bfloat16 on a GPU and float32 on the CPU.

    Raises:
        FileNotFoundError: ``model_dir`` is not a directory with a ``config.json``.
    """
    import torch

    from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
    from nemo_automodel_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); `bard-vl tiny DIR` writes one")
    device = device or default_device()
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    model = BardVLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch_dtype, _attn_implementation="sdpa", use_safetensors=True
    )
    model = model.to(device).eval()
    processor = BardVLProcessor.from_pretrained(str(path))
    return model, processor


class TextStream:
    """Turns token ids arriving block by block into text deltas (held back while a UTF-8 sequence is open)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.sent = ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add ``ids``; return the new text that is safe to show."""
        self.ids.extend(int(i) for i in ids)
        text = self.text()
        if not final and text.endswith("\ufffd"):
            return ""
        if text.startswith(self.sent):
            delta = text[len(self.sent) :]
        else:  # a merge changed earlier characters (rare): send nothing wrong, only what follows
            common = 0
            for a, b in zip(text, self.sent):
                if a != b:
                    break
                common += 1
            delta = text[max(common, len(self.sent)) :] if len(text) > len(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent + delta
        return delta


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


__all__ = ["ChatInputError", "TextStream", "cut_at_stop", "default_device", "encode_chats", "encode_messages",
           "load_for_inference"]

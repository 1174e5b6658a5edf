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

    ``model_dir`` is a model directory, or a LoRA adapter directory in the ``peft`` format (``adapter_config.json``
    + ``adapter_model.safetensors``, as a ``peft=lora`` run exports it; docs/peft.md): the base model it names
    (``base_model_name_or_path``) is loaded with the adapter directory's ``config.json`` when it has one (a stage
    may change the block size), the adapters are applied with ``peft`` and merged into the weights, and the
    processor comes from the adapter directory when it holds the tokenizer files, else from the base.

    Weights are read from safetensors only (no pickle) and no code from the checkpoint is run. The model
    uses SDPA attention; ``dtype`` defaults to bfloat16 on a GPU and float32 on the CPU.

    Raises:
        FileNotFoundError: ``model_dir`` is neither a directory with a ``config.json`` nor an adapter directory
            (or the adapter's weights are not in safetensors).
        ImportError: an adapter directory without ``peft`` installed.
    """
    import torch

    from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
    from nemo_automodel_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    path = Path(model_dir)
    adapter = (path / "adapter_config.json").is_file()
    if not adapter and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json) nor a LoRA adapter directory "
                                f"(no adapter_config.json); `bard-vl tiny DIR` writes a model directory")
    device = device or default_device()
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    if adapter:
        model, processor_dir = _load_with_adapter(path, torch_dtype)
    else:
        model = BardVLForConditionalGeneration.from_pretrained(
            str(path), dtype=torch_dtype, _attn_implementation="sdpa", use_safetensors=True
        )
        processor_dir = path
    model = model.to(device).eval()
    processor = BardVLProcessor.from_pretrained(str(processor_dir))
    return model, processor


def _load_with_adapter(path: Path, torch_dtype: Any) -> tuple[Any, Path]:
    """The base Bard-VL of a ``peft`` LoRA adapter directory with the adapters merged in, and the directory to read
    the processor from."""
    import json

    from nemo_automodel_bard.models.bard_vl.configuration_bard_vl import BardVLConfig
    from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration

    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError(f"{path} is a LoRA adapter directory; loading it needs peft "
                          f"(pip install 'nemo-automodel-bard[peft]'), or decode its merged export instead") from None
    if not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: adapter_config.json without adapter_model.safetensors (only safetensors "
                                f"adapters are loaded)")
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FileNotFoundError(f"{path / 'adapter_config.json'} does not name its base model (base_model_name_or_path)")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "sdpa", "use_safetensors": True}
    if (path / "config.json").is_file():
        kwargs["config"] = BardVLConfig.from_pretrained(str(path))
    model = BardVLForConditionalGeneration.from_pretrained(str(base), **kwargs)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return model, (path if has_tokenizer else Path(str(base)))


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

"""Model builders for the Bard-VL recipes (``model._target_`` in the YAML).

NeMo-AutoModel 0.7.0's VLM recipe only accepts its own ``NeMoAutoModel*`` loaders, which call
``torch.cuda.current_device()`` and so cannot run on a CPU host. The builders here load the model
with transformers on the host, then hand it to NeMo's own ``apply_model_infrastructure`` (freezing,
PEFT, FSDP2 / megatron-FSDP / DDP sharding, recording the pre-shard key set used by the consolidated
Hugging Face export, device placement). They accept every keyword argument the recipe passes to a
model target (``distributed_setup``, ``peft_config``, ``freeze_config``, ``fp8_config``,
``compile_config``, ``quantization_config``), and work on CPU (gloo) and GPU (nccl) alike.

* :func:`build_bard_vl` -- a Bard-VL directory (the AR-init output or a previous PBM stage).
* :func:`build_qwen3_vl_ar` -- a plain, causal Qwen3-VL (the AR objective), optionally a random tiny
  one (``tiny: {...}``) that stands in for a pretrained Qwen3-VL in the embedded pipeline.

YAML::

    model:
      _target_: nemo_automodel_bard.recipes.model_builder.build_bard_vl
      pretrained_model_name_or_path: runs/tiny/ar_init
      torch_dtype: float32          # bfloat16 on GPUs
      attn_implementation: sdpa     # flex_attention on GPUs (FlexAttention text tower, SDPA vision)
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ModelConfigError",
    "build_bard_vl",
    "build_qwen3_vl_ar",
    "check_model_path",
    "check_model_type",
]

class ModelConfigError(ValueError):
    """The ``model:`` section of a recipe does not describe a usable model."""


def _is_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path (no leading ``.``, ``/``, ``~``; ``org`` not a local directory)."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~")) and not Path(parts[0]).exists()


def check_model_path(path: Optional[str], *, key: str = "model.pretrained_model_name_or_path") -> Optional[Path]:
    """Validate a model path from the YAML; return it as a ``Path`` when it is a local directory.

    A string with one ``/`` and no leading ``.``, ``/`` or ``~`` that does not exist locally is taken
    for a Hugging Face hub id and returned as ``None`` (transformers resolves it).

    Raises:
        ModelConfigError: the key is missing, or a local-looking path is not a model directory.
    """
    if path is None or (isinstance(path, str) and not path.strip()):
        raise ModelConfigError(
            f"{key} is not set: point it at a model directory (the AR-init output for the first PBM stage, "
            f"the previous stage's export '<checkpoint_dir>/final' for the next ones)"
        )
    p = Path(str(path)).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelConfigError(f"{key}={str(path)!r} is a directory without config.json, so it is not a model directory")
        return p
    if p.exists():
        raise ModelConfigError(f"{key}={str(path)!r} is a file; it must be a model directory")
    if not _is_hub_id(str(path)):
        hint = ""
        if p.name == "final" or "pbm_b" in str(path) or "ar_init" in str(path):
            hint = " (has the previous stage -- AR init or the previous PBM stage -- been run?)"
        raise ModelConfigError(f"{key}={str(path)!r} does not exist{hint}")
    return None  # a hub id


def check_model_type(path: Path, expected: str) -> None:
    """Raise :class:`ModelConfigError` if the directory's ``config.json`` is not of ``expected`` type."""
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == expected:
        return
    if expected == "bard_vl":
        raise ModelConfigError(
            f"{path / 'config.json'}: model_type is {model_type!r}, not 'bard_vl'. Convert an autoregressive "
            f"Qwen3-VL first: python -m nemo_automodel_bard.recipes.ar_init {path} OUT_DIR --block-size 2"
        )
    raise ModelConfigError(
        f"{path / 'config.json'}: model_type is {model_type!r}; the AR objective trains a plain Qwen3-VL "
        f"(model_type {expected!r})"
    )


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype(torch_dtype: Any) -> torch.dtype:
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    from nemo_automodel.shared.utils import dtype_from_str

    return dtype_from_str(str(torch_dtype))


#: keyword arguments NeMo's VLM recipe passes to a model target besides the YAML's own keys
_INFRASTRUCTURE_KEYS = (
    "distributed_setup", "peft_config", "freeze_config", "fp8_config", "compile_config", "quantization_config",
)


def _pop_infrastructure(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the recipe-passed infrastructure keywords out of ``kwargs`` (missing ones are ``None``)."""
    return {key: kwargs.pop(key, None) for key in _INFRASTRUCTURE_KEYS}


def _apply_infrastructure(
    model: torch.nn.Module,
    path: Optional[str],
    *,
    distributed_setup: Any,
    peft_config: Any,
    freeze_config: Optional[dict],
    fp8_config: Any,
    compile_config: Any,
    quantization_config: Any,
) -> torch.nn.Module:
    """Freeze / PEFT / shard / place ``model`` with NeMo's own infrastructure code."""
    from nemo_automodel._transformers.infrastructure import apply_model_infrastructure, instantiate_infrastructure

    if quantization_config is not None:
        raise ModelConfigError("the Bard-VL builders do not support `quantization:` (weights are trained in full)")
    device = _device()
    if distributed_setup is None:
        return model.to(device)
    mesh = distributed_setup.mesh_context
    if getattr(mesh, "pp_size", 1) > 1:
        raise ModelConfigError("pipeline parallelism (distributed.pp_size > 1) is not supported for Bard-VL")
    model_wrapper, autopipeline, parallelize_fn, qat_quantizer = instantiate_infrastructure(
        distributed_config=distributed_setup.strategy_config,
        pipeline_config=None,
        moe_parallel_config=distributed_setup.moe_parallel_config,
        activation_checkpointing=distributed_setup.activation_checkpointing,
        device=device,
        mesh=mesh,
    )
    return apply_model_infrastructure(
        model,
        is_meta_device=False,
        device=device,
        model_wrapper=model_wrapper,
        mesh=mesh,
        peft_config=peft_config,
        fp8_config=fp8_config,
        compile_config=compile_config,
        qat_quantizer=qat_quantizer,
        autopipeline=autopipeline,
        parallelize_fn=parallelize_fn,
        pretrained_model_name_or_path=path or "",
        load_base_model=False,
        weights_already_loaded=True,
        freeze_config=freeze_config,
    )


def build_bard_vl(
    pretrained_model_name_or_path: Optional[str] = None,
    *,
    torch_dtype: Any = "float32",
    attn_implementation: str = "sdpa",
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a Bard-VL directory for training and apply NeMo's distributed infrastructure.

    Args:
        pretrained_model_name_or_path: a Bard-VL directory (``model_type: bard_vl``): the AR-init
            output or a previous stage's export. A plain Qwen3-VL directory is refused with a pointer to
            ``python -m nemo_automodel_bard.recipes.ar_init``.
        torch_dtype: storage dtype (``float32`` on CPU; ``bfloat16`` on GPUs).
        attn_implementation: ``sdpa`` / ``eager`` (dense additive mask) or ``flex_attention``
            (FlexAttention ``BlockMask`` for the text tower, SDPA for the vision tower; GPU only for
            training, since FlexAttention has no CPU backward).
        kwargs: what the recipe passes (``distributed_setup``, ``peft_config``, ``freeze_config``,
            ``fp8_config``, ``compile_config``, ``quantization_config``); anything else goes to
            ``from_pretrained``.

    Returns:
        the (possibly FSDP2-sharded) :class:`BardVLForConditionalGeneration` on the training device.
    """
    from nemo_automodel_bard.models.bard_vl import BardVLForConditionalGeneration

    local = check_model_path(pretrained_model_name_or_path)
    if local is not None:
        check_model_type(local, "bard_vl")
    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ModelConfigError(
            "model.attn_implementation=flex_attention needs a GPU for training (FlexAttention has no CPU backward); "
            "use sdpa on CPU"
        )
    infrastructure = _pop_infrastructure(kwargs)
    model = BardVLForConditionalGeneration.from_pretrained(
        pretrained_model_name_or_path,
        dtype=_dtype(torch_dtype),
        attn_implementation=attn_implementation,
        **kwargs,
    )
    return _apply_infrastructure(model, pretrained_model_name_or_path, **infrastructure)


def build_qwen3_vl_ar(
    pretrained_model_name_or_path: Optional[str] = None,
    *,
    tiny: Optional[dict] = None,
    init_seed: int = 0,
    vision_warmup: Optional[dict] = None,
    torch_dtype: Any = "float32",
    attn_implementation: str = "sdpa",
    **infrastructure_kwargs: Any,
) -> torch.nn.Module:
    """A plain autoregressive Qwen3-VL for the AR objective (exports as ``model_type: qwen3_vl``).

    Args:
        pretrained_model_name_or_path: a Qwen3-VL directory or hub id; or ``None`` together with
            ``tiny``.
        tiny: build a *random* tiny Qwen3-VL instead, with these
            :func:`~nemo_automodel_bard.fixtures.tiny.tiny_config` keyword arguments (``{}`` for the
            defaults); its token ids match ``build_tiny_processor()``, which the YAML must then use as
            ``processor:``.
        init_seed: seed of the random initialisation (the same on every rank).
        vision_warmup: with ``tiny``, first pre-train the random vision tower on per-cell labels of the
            embedded shapes task (keyword arguments of
            :func:`~nemo_automodel_bard.recipes.vision_warmup.warm_up_vision_tower`, e.g. ``{steps: 100}``),
            standing in for the pretrained vision encoder a real Qwen3-VL starts from. Seeded, so every
            rank computes the same weights before sharding.
        infrastructure_kwargs: what the recipe passes (``distributed_setup``, ``peft_config``, ...).
    """
    from nemo_automodel.components.models.qwen3_vl.model import Qwen3VLForConditionalGeneration

    from nemo_automodel_bard.models.bard_vl.modeling_bard_vl import use_linear_patch_embed

    infrastructure = _pop_infrastructure(infrastructure_kwargs)
    if infrastructure_kwargs:
        raise ModelConfigError(f"model: unknown key(s) {sorted(infrastructure_kwargs)} for build_qwen3_vl_ar")
    if tiny is not None:
        if pretrained_model_name_or_path is not None:
            raise ModelConfigError("set either model.pretrained_model_name_or_path or model.tiny, not both")
        from nemo_automodel_bard.fixtures.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        from nemo_automodel_bard.fixtures.tiny import tiny_qwen3_vl_config

        config = tiny_qwen3_vl_config(tokenizer, **dict(tiny))
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            model = Qwen3VLForConditionalGeneration(copy.deepcopy(config))
        model = model.to(_dtype(torch_dtype))
        use_linear_patch_embed(model)
        if vision_warmup:
            from nemo_automodel_bard.fixtures.tiny import build_tiny_processor
            from nemo_automodel_bard.recipes.vision_warmup import warmup_from_config

            with torch.random.fork_rng(devices=[]):
                warmup_from_config(model, build_tiny_processor(tokenizer), dict(vision_warmup))
    else:
        if vision_warmup:
            raise ModelConfigError("model.vision_warmup only applies to a random tiny model (model.tiny)")
        local = check_model_path(pretrained_model_name_or_path)
        if local is not None:
            check_model_type(local, "qwen3_vl")
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            pretrained_model_name_or_path, dtype=_dtype(torch_dtype), attn_implementation=attn_implementation
        )
        use_linear_patch_embed(model)
    return _apply_infrastructure(model, pretrained_model_name_or_path, **infrastructure)

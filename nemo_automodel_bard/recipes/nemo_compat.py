"""Every adaptation of NeMo-AutoModel internals, in one place, checked against the NeMo version we tested.

Our recipes subclass NeMo's ``FinetuneRecipeForVLM`` and use its public machinery, but a block-diffusion
objective needs a few things NeMo's VLM recipe does not offer as public hooks:

* **replaced private methods** -- ``_forward_backward_step``, ``_run_train_optim_step`` and
  ``_run_validation_epoch`` own the loss normalisation (a global count over the optimizer step's
  micro-batches and data-parallel ranks); our recipe base overrides them. A NeMo release that changes them
  may have changed what the training loop expects of them, so their source is fingerprinted here;
* **called private methods** -- ``_get_dp_group_size``, ``_dp_allreduce``, ``_autocast_context``,
  ``_make_progress_bar`` and the training utilities our step calls; their parameters are checked;
* **a module-level function swapped inside a context** -- ``nemo_automodel.recipes.vlm.finetune.build_model``
  accepts only NeMo's own loaders as ``model._target_``; :func:`accept_custom_model_targets` lets it take our
  builders too while NeMo's ``setup()`` runs, and restores it afterwards;
* **a CPU shim** -- NeMo 0.7.0 calls ``torch.cuda.reset_peak_memory_stats()`` unconditionally;
  :func:`cpu_cuda_guard` makes it a no-op on a host without CUDA, for the duration of the call only;
* **the typed dataloader config, for Energon data** -- :mod:`.energon_loader` puts its own loader config in
  place of ``RecipeConfig.vlm_dataloader`` / ``vlm_validation_dataloader`` (cached properties, so an instance
  entry wins), resolves the processor section with ``RecipeConfig._resolve_vlm_processor`` and builds NeMo's
  ``VlmCollatorConfig`` / ``VlmDataloaderBuild``; the keywords NeMo's setup passes to ``build`` are checked;
* **the preemption handler** -- the recipe base chains its own handler in front of the one NeMo's step scheduler
  installs (``StepScheduler.sig_handler``, a ``DistributedSignalHandler``: its ``sigs`` and ``release()``), to
  record which signal stopped a run; without those attributes it leaves NeMo's handler alone.

:func:`check_nemo_compat` compares the installed NeMo with :data:`TESTED_NEMO_VERSION`: a parameter list
that changed raises :class:`NemoCompatError` (the recipe could not work); a changed method body logs a
warning naming the method (the recipe may still work; re-check the override, then update the digest). The
test suite runs the same check with ``strict=True``, so CI fails loudly on a NeMo upgrade until someone has
looked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
from importlib import metadata
from typing import Any, Callable

import torch

import nemo_automodel.recipes.vlm.finetune as _vlm_finetune
from nemo_automodel.components.datasets.vlm import loader as _vlm_loader
from nemo_automodel.components.training import utils as _training_utils
from nemo_automodel.recipes._typed_config import RecipeConfig as _RecipeConfig
from nemo_automodel.components.training.rng import ScopedRNG

logger = logging.getLogger(__name__)

__all__ = [
    "CALLED_SIGNATURES",
    "NemoCompatError",
    "REPLACED_SOURCES",
    "TESTED_NEMO_VERSION",
    "accept_custom_model_targets",
    "check_nemo_compat",
    "cpu_cuda_guard",
    "installed_nemo_version",
]

#: the NeMo-AutoModel release the adaptations below were written and tested against
TESTED_NEMO_VERSION = "0.7.0"

_RECIPE = _vlm_finetune.FinetuneRecipeForVLM

#: NeMo methods our recipe base replaces, and the sha256 (first 16 hex digits) of their source in the tested
#: release. ``run_train_validation_loop`` is not replaced but drives the three: it is checked for the same reason.
REPLACED_SOURCES: dict[str, str] = {
    "FinetuneRecipeForVLM._forward_backward_step": "c654b6d626c93c92",
    "FinetuneRecipeForVLM._run_train_optim_step": "58e5efdbf7cef564",
    "FinetuneRecipeForVLM._run_validation_epoch": "cb89e3f336aa0b0d",
    "FinetuneRecipeForVLM.run_train_validation_loop": "9c45aaf6be4d48f8",
}

#: NeMo callables our code calls or wraps, with the parameters it relies on (names, in order)
CALLED_SIGNATURES: dict[str, tuple[str, ...]] = {
    "FinetuneRecipeForVLM._forward_backward_step": (
        "self", "idx", "batch", "loss_buffer", "num_label_tokens", "num_batches", "is_train"),
    "FinetuneRecipeForVLM._run_train_optim_step": ("self", "batches", "max_grad_norm"),
    "FinetuneRecipeForVLM._run_validation_epoch": ("self", "val_dataloader"),
    "FinetuneRecipeForVLM._get_dp_group_size": ("self", "include_cp"),
    "FinetuneRecipeForVLM._dp_allreduce": ("self", "tensor", "op", "include_cp"),
    "FinetuneRecipeForVLM._autocast_context": ("self",),
    "FinetuneRecipeForVLM._make_progress_bar": ("self", "total", "initial"),
    "FinetuneRecipeForVLM.load_checkpoint": ("self", "restore_from"),
    "FinetuneRecipeForVLM.save_checkpoint": ("self", "epoch", "step", "train_loss", "val_loss", "best_metric_key"),
    "FinetuneRecipeForVLM.log_train_metrics": ("self", "log_data"),
    "finetune.build_model": ("cfg_model", "cfg_freeze", "cfg_peft", "seed", "cfg_fp8", "cfg_compile",
                             "distributed_setup", "cfg_quantization"),
    "finetune._is_recipe_target": None,  # type: ignore[dict-item]  # only its presence
    "training.utils.scale_grads_and_clip_grad_norm": None,  # type: ignore[dict-item]
    "training.utils.prepare_for_grad_accumulation": None,  # type: ignore[dict-item]
    "training.utils.prepare_for_final_backward": None,  # type: ignore[dict-item]
    "training.utils.prepare_after_first_microbatch": None,  # type: ignore[dict-item]
    "RecipeConfig._resolve_vlm_processor": ("node",),
    "vlm.loader.VlmCollatorConfig": ("factory", "kwargs"),
    "vlm.loader.VlmDataloaderBuild": ("dataloader", "processor"),
}

#: NeMo callables and the keyword arguments that pass between them and our code (a subset of their parameters):
#: what our optimizer step passes to ``scale_grads_and_clip_grad_norm``, and what NeMo's setup passes to a
#: dataloader config's ``build`` (our Energon stand-in reads these)
KEYWORDS_USED: dict[str, tuple[str, ...]] = {
    "training.utils.scale_grads_and_clip_grad_norm": (
        "max_grad_norm", "model_parts", "norm_type", "pp_enabled", "device_mesh", "moe_mesh", "foreach",
        "num_label_tokens", "dp_group_size", "grad_norm_backend"),
    "vlm.loader.VlmDataloaderConfig.build": (
        "pretrained_model_name_or_path", "dp_rank", "dp_world_size", "batch_size", "dataset_build_context"),
}

#: ``RecipeConfig`` attributes :mod:`.energon_loader` replaces per instance (must stay ``functools.cached_property``)
CACHED_CONFIG_PROPERTIES = ("vlm_dataloader", "vlm_validation_dataloader")


class NemoCompatError(RuntimeError):
    """The installed NeMo-AutoModel lacks (or changed the parameters of) a private hook our recipes need."""


def installed_nemo_version() -> str:
    """The installed ``nemo-automodel`` distribution's version (package metadata, not a git describe)."""
    try:
        return metadata.version("nemo-automodel")
    except metadata.PackageNotFoundError:  # pragma: no cover - an uninstalled source tree
        return "unknown"


def _resolve(name: str) -> Any:
    owner, _, attr = name.rpartition(".")
    if owner.startswith("vlm.loader."):  # a member of a class of the loader module
        owner_obj = getattr(_vlm_loader, owner[len("vlm.loader."):], None)
        return getattr(owner_obj, attr, None) if owner_obj is not None else None
    base = {"FinetuneRecipeForVLM": _RECIPE, "finetune": _vlm_finetune, "training.utils": _training_utils,
            "RecipeConfig": _RecipeConfig, "vlm.loader": _vlm_loader}[owner]
    return getattr(base, attr, None)


def _source_digest(obj: Callable) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def compat_report() -> dict[str, list[str]]:
    """``{"missing": [...], "signature": [...], "source": [...]}``: what differs from the tested NeMo."""
    report: dict[str, list[str]] = {"missing": [], "signature": [], "source": []}
    for name, params in CALLED_SIGNATURES.items():
        obj = _resolve(name)
        if obj is None:
            report["missing"].append(name)
            continue
        if params is not None and tuple(inspect.signature(obj).parameters) != params:
            report["signature"].append(f"{name}{inspect.signature(obj)} (expected parameters {params})")
    for name, keywords in KEYWORDS_USED.items():
        obj = _resolve(name)
        if obj is None:
            report["missing"].append(name)
            continue
        absent = [k for k in keywords if k not in inspect.signature(obj).parameters]
        if absent:
            report["signature"].append(f"{name} lacks {absent}")
    for attr in CACHED_CONFIG_PROPERTIES:
        if not isinstance(_RecipeConfig.__dict__.get(attr), functools.cached_property):
            report["signature"].append(f"RecipeConfig.{attr} is no longer a cached property (the Energon loaders "
                                       "replace it per instance)")
    for name, digest in REPLACED_SOURCES.items():
        obj = _resolve(name)
        if obj is not None and _source_digest(obj) != digest:
            report["source"].append(name)
    return report


_CHECKED = False


def check_nemo_compat(*, strict: bool = False) -> dict[str, list[str]]:
    """Check the installed NeMo against the tested one (once per process unless ``strict``).

    Raises :class:`NemoCompatError` for a missing hook or changed parameters; a changed method body is a
    warning, or an error with ``strict=True`` (the test suite). Returns the report."""
    global _CHECKED
    if _CHECKED and not strict:
        return {"missing": [], "signature": [], "source": []}
    report = compat_report()
    version = installed_nemo_version()
    broken = report["missing"] + report["signature"]
    if broken:
        raise NemoCompatError(
            f"nemo-automodel {version} (tested: {TESTED_NEMO_VERSION}) changed private hooks the Bard-VL recipes "
            f"rely on: {'; '.join(broken)}. Install nemo-automodel=={TESTED_NEMO_VERSION} or adapt "
            "nemo_automodel_bard/recipes/nemo_compat.py and recipes/common.py")
    if report["source"]:
        message = (f"nemo-automodel {version} (tested: {TESTED_NEMO_VERSION}) changed the methods our recipe base "
                   f"replaces: {', '.join(report['source'])}. Check that recipes/common.py still does what they do "
                   "(loss normalisation, gradient accumulation), then update REPLACED_SOURCES in "
                   "nemo_automodel_bard/recipes/nemo_compat.py")
        if strict:
            raise NemoCompatError(message)
        logger.warning(message)
    _CHECKED = True
    return report


# ---------------------------------------------------------------------------------------------- shims


@contextlib.contextmanager
def cpu_cuda_guard():
    """Make ``torch.cuda.reset_peak_memory_stats`` a no-op while NeMo code runs on a CPU-only host.

    NeMo 0.7.0 calls it unconditionally (``FinetuneRecipeForVLM.setup`` and ``log_train_metrics``);
    without CUDA it raises. With CUDA this context does nothing.
    """
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.reset_peak_memory_stats
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    try:
        yield
    finally:
        torch.cuda.reset_peak_memory_stats = original


_ORIGINAL_BUILD_MODEL = _vlm_finetune.build_model


def _build_model(cfg_model, cfg_freeze, cfg_peft, seed, cfg_fp8=None, cfg_compile=None,
                 distributed_setup=None, cfg_quantization=None):  # fmt: skip
    """``finetune.build_model`` that also accepts the Bard-VL builders as ``model._target_``."""
    target = cfg_model.get("_target_", None)
    if _vlm_finetune._is_recipe_target(target):
        return _ORIGINAL_BUILD_MODEL(
            cfg_model, cfg_freeze, cfg_peft, seed, cfg_fp8=cfg_fp8, cfg_compile=cfg_compile,
            distributed_setup=distributed_setup, cfg_quantization=cfg_quantization,
        )  # fmt: skip
    from nemo_automodel.components.quantization.fp8 import build_fp8_config
    from nemo_automodel.components.utils.compile_utils import build_compile_config

    kwargs: dict[str, Any] = {
        "peft_config": cfg_peft,
        "freeze_config": cfg_freeze.to_dict() if cfg_freeze is not None else None,
        "distributed_setup": distributed_setup,
    }
    if cfg_fp8 is not None:
        kwargs["fp8_config"] = build_fp8_config(cfg_fp8)
    if cfg_compile is not None:
        kwargs["compile_config"] = build_compile_config(cfg_compile)
    if cfg_quantization is not None:
        kwargs["quantization_config"] = cfg_quantization
    with ScopedRNG(seed=seed, ranked=True):
        return cfg_model.instantiate(**kwargs)


@contextlib.contextmanager
def accept_custom_model_targets():
    """Within the context, NeMo's VLM recipe accepts any callable ``model._target_`` (it keeps its own
    handling of the ``NeMoAutoModel*`` loaders). The module global is restored afterwards."""
    _vlm_finetune.build_model = _build_model
    try:
        yield
    finally:
        _vlm_finetune.build_model = _ORIGINAL_BUILD_MODEL

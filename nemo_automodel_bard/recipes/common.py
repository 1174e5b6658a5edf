"""Shared machinery of the Bard-VL NeMo recipes (PBM, AR pre-training).

:class:`BardRecipeBase` subclasses NeMo-AutoModel's ``FinetuneRecipeForVLM`` and keeps its setup,
distributed initialisation, FSDP2 / megatron-FSDP / DDP sharding, optimizer and LR-scheduler
construction, checkpointing (DCP shards + consolidated Hugging Face export), resume, JSONL / W&B /
MLflow logging and training loop. It replaces what cannot serve a block-diffusion objective:

* the model target: our builders (:mod:`nemo_automodel_bard.recipes.model_builder`) are accepted next
  to NeMo's own ``NeMoAutoModel*`` loaders;
* the optimizer step: the loss of a micro-batch is normalised by a *global* count of the optimizer
  step (all micro-batches, all data-parallel ranks) so that 1 and N processes, with or without
  gradient accumulation, give the same loss and gradients; the LR scheduler is stepped once per
  optimizer step;
* validation and logging (objective-specific metrics, per-group learning rates);
* the end of a run: a pointer ``<checkpoint_dir>/final`` (symlink) and ``export.json`` to the
  consolidated Hugging Face directory, which holds config, weights, generation config and the
  processor / tokenizer files -- a complete model directory for the next stage.

Every use of NeMo internals (the replaced private methods, the model-builder swap, the CPU shim) is listed
and version-checked in :mod:`nemo_automodel_bard.recipes.nemo_compat`; ``setup()`` runs that check first.
Without CUDA NeMo leaves the training device unset; ``setup()`` sets the CPU.

Recipe-specific YAML keys live in a ``bard:`` section:

``bard.stop_after_steps``
    stop (with a checkpoint, like a preemption) once this many optimizer steps have run in total;
    used to test resume. The LR schedule still follows ``step_scheduler.max_steps``.

Stopping on a signal (a scheduler's SIGTERM, a terminal's SIGINT): NeMo's step scheduler checks its
``step_scheduler.preemption_signal`` once per optimizer step and, when one arrived, checkpoints that step and
leaves the loop. :func:`run_recipe` with ``install_signal_handler=True`` (the pipeline's stage processes) and the
pipeline's torchrun stages listen to both :data:`STOP_SIGNALS`. On top of that the recipe records *which* signal
stopped it (``stop_signal``), keeps the data-loader worker processes out of it (they ignore both signals and end
with the trainer, so a signal sent to a whole process group cannot kill them before the checkpoint is written),
and writes ``<checkpoint_dir>/stopped.json`` (:data:`STOP_MARKER`: the signal, the step, the checkpoint
directory) so that whoever started it can say where to resume from.
``bard.progress_bar``
    ``auto`` (default: a tqdm bar on rank 0 when stderr is a terminal), ``true`` or ``false``.
``bard.attention`` (PBM only)
    ``auto`` (FlexAttention ``BlockMask`` for a flex model, dense additive mask otherwise), ``dense``
    or ``flex``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

import nemo_automodel_bard.models.bard_vl  # noqa: F401 - registers Bard-VL with transformers and NeMo
from nemo_automodel.components.distributed.tp_replicas import synchronize_tp_replica_gradients
from nemo_automodel.components.distributed.utils import get_sync_ctx
from nemo_automodel.components.loggers.metric_logger import MetricsSample
from nemo_automodel.components.training.rng import ScopedRNG
from nemo_automodel.components.training.utils import (
    prepare_after_first_microbatch,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
    scale_grads_and_clip_grad_norm,
)
from nemo_automodel.recipes.vlm.finetune import FinetuneRecipeForVLM
from nemo_automodel.shared.import_utils import safe_import

from .collate import resolve_collate
from .energon_loader import install_stream_dataloaders
from .nemo_compat import accept_custom_model_targets, check_nemo_compat, cpu_cuda_guard
from .stop_signals import STOP_MARKER, STOP_SIGNALS, stop_signal_override
from .model_builder import ModelConfigError, build_bard_vl, build_qwen3_vl_ar, check_model_path, check_model_type

_HAS_WANDB, wandb = safe_import("wandb")
_HAS_MLFLOW, mlflow = safe_import("mlflow")

logger = logging.getLogger(__name__)

__all__ = [
    "BardRecipeBase",
    "NoUsableSamplesError",
    "RecipeConfigError",
    "STOP_MARKER",
    "STOP_SIGNALS",
    "load_recipe_config",
    "param_group_kind",
    "run_recipe",
]

#: the default ``loss_fn`` section NeMo's setup requires (unused by our steps)
_PLACEHOLDER_LOSS = "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy"
_BARD_KEYS = {"stop_after_steps", "progress_bar", "attention"}
_OUR_BUILDERS = (build_bard_vl, build_qwen3_vl_ar)

#: parameter-name patterns of the three learning-rate groups (Qwen3-VL / Bard-VL names)
MERGER_PATTERN = r"(^|\.)visual\.(merger|deepstack_merger_list)\."
VISION_PATTERN = r"(^|\.)visual\."



_STEP_RE = re.compile(r"step_(\d+)$")


class _IgnoreStopSignals:
    """A data-loader ``worker_init_fn`` that first makes the worker ignore :data:`STOP_SIGNALS`, then runs the
    loader's own ``worker_init_fn`` (if any). The trainer decides when to stop; its workers end with it.
    A class, not a closure, so that it pickles for the ``spawn`` / ``forkserver`` start methods."""

    def __init__(self, worker_init_fn: Any = None) -> None:
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def _checkpoint_step(path: Path) -> int:
    match = _STEP_RE.search(path.name)
    return int(match.group(1)) if match else -1


def _set_aside(checkpoint: Path) -> Path:
    """Rename a checkpoint that cannot be resumed to ``<name>.unreadable-<time>`` (kept for inspection; its
    step can then be checkpointed again). Only the first rank renames."""
    kept = checkpoint.with_name(f"{checkpoint.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    if int(os.environ.get("RANK", "0")) == 0 and checkpoint.is_dir():
        os.rename(checkpoint, kept)
    return kept


def _host_peak_rss_gib() -> float:
    """This process's peak resident set size so far (GiB; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """What makes a checkpoint directory unresumable at a glance (``None``: nothing found): the model and
    optimizer shards with their ``.metadata`` index and the scheduler state must be there."""
    if not checkpoint.is_dir():
        return "not a directory"
    for part in ("model", "optim"):
        if not (checkpoint / part).is_dir():
            return f"{part}/ is missing"
        if not (checkpoint / part / ".metadata").is_file() and not any((checkpoint / part).glob("*.safetensors")):
            return f"{part}/.metadata is missing"
    if not (checkpoint / "step_scheduler.pt").is_file():
        return "step_scheduler.pt is missing"
    return None


class RecipeConfigError(ValueError):
    """A recipe YAML is missing a key or sets one to an unusable value."""


class NoUsableSamplesError(RuntimeError):
    """Training stopped: the data yielded no usable sample (every record skipped, a wrong path, ...)."""


#: optimizer steps without a single usable sample after which a run stops (and exports nothing)
NO_SAMPLE_STEPS = 10


def param_group_kind(name: str) -> str:
    """``"merger"``, ``"vision"`` or ``"language"`` for a (Qwen3-VL / Bard-VL) parameter name."""
    if re.search(MERGER_PATTERN, name):
        return "merger"
    if re.search(VISION_PATTERN, name):
        return "vision"
    return "language"


# ---------------------------------------------------------------------------------------------- config


def _target_name(value: Any) -> str:
    if value is None:
        return "None"
    module = getattr(value, "__module__", None)
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    return f"{module}.{name}" if module and name else repr(value)


def load_recipe_config(config_path: str | os.PathLike, overrides: Sequence[str] = ()):
    """Load a recipe YAML with NeMo's loader and apply ``--a.b=c`` overrides (as the CLI does)."""
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

    path = Path(config_path)
    if not path.is_file():
        raise RecipeConfigError(f"recipe YAML {str(path)!r} does not exist")
    return parse_args_and_load_config(str(path), argv=list(overrides))


def run_recipe(
    config_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    recipe_cls: Optional[type] = None,
    install_signal_handler: bool = False,
) -> "BardRecipeBase":
    """Run a recipe YAML in this process (no torchrun): load, ``setup()``, train; return the recipe.

    With one process NeMo needs no ``MASTER_ADDR`` (a ``HashStore`` backs the process group) and a
    second recipe in the same process reuses the process group. ``install_signal_handler=False``
    sets ``step_scheduler.preemption_signal=None`` (no SIGTERM handler is left behind);
    ``install_signal_handler=True`` stops the run cleanly on any of :data:`STOP_SIGNALS` (checkpoint, then
    return; ``runner.stop_signal`` says which) and restores the process's previous handlers when it returns.
    """
    overrides = list(overrides)
    if not any(o.startswith("--step_scheduler.preemption_signal") for o in overrides):
        overrides.append(stop_signal_override() if install_signal_handler else "--step_scheduler.preemption_signal=None")
    cfg = load_recipe_config(config_path, overrides)
    if recipe_cls is None:
        import importlib

        recipe = cfg.get("recipe", None)
        if hasattr(recipe, "get"):
            recipe = recipe.get("_target_", None)
        if callable(recipe):
            recipe = _target_name(recipe)
        if not isinstance(recipe, str) or "." not in recipe:
            raise RecipeConfigError(f"{config_path}: `recipe:` must name the recipe class by its dotted path, got {recipe!r}")
        module, name = recipe.rsplit(".", 1)
        recipe_cls = getattr(importlib.import_module(module), name)
    runner = recipe_cls(cfg)
    try:
        runner.setup()
        runner.run_train_validation_loop()
    finally:
        handler = getattr(getattr(runner, "step_scheduler", None), "sig_handler", None)
        if handler is not None:  # the handlers this process had before the run
            handler.release()
    return runner


# ---------------------------------------------------------------------------------------------- recipe


class BardRecipeBase(FinetuneRecipeForVLM):
    """Common base of the Bard-VL recipes (see the module docstring).

    Subclasses define :attr:`objective`, :attr:`collate_fn_name`, :attr:`builders`,
    :meth:`_local_counts`, :meth:`_compute_loss` and optionally :meth:`_prepare_model`.
    """

    #: short name written to logs and ``export.json``
    objective: str = ""
    #: dotted name of the collate function the YAML must use
    collate_fn_name: str = ""
    #: the model builders this objective accepts (besides NeMo's own loaders)
    builders: tuple = _OUR_BUILDERS
    #: key of :meth:`_local_counts` that normalises the loss (all-reduced over the optimizer step)
    denominator_key: str = "samples"
    #: ``bard:`` keys a subclass accepts besides :data:`_BARD_KEYS`
    extra_bard_keys: frozenset = frozenset()

    def __init__(self, cfg: Any) -> None:
        if cfg.get("loss_fn", None) is None:  # NeMo's setup() builds it; our steps do not use it
            cfg.set_by_dotted("loss_fn._target_", _PLACEHOLDER_LOSS)
        super().__init__(cfg)

    # ------------------------------------------------------------------ setup
    def validate_config(self) -> None:
        """Check the YAML before anything heavy runs; raise :class:`RecipeConfigError` naming the key."""
        cfg = self.cfg
        if cfg.get("model", None) is None:
            raise RecipeConfigError("the recipe YAML has no `model:` section")
        target = cfg.get("model._target_", None)
        if target is None:
            raise RecipeConfigError(
                "model._target_ is not set; use nemo_automodel_bard.recipes.model_builder.build_bard_vl "
                "(or build_qwen3_vl_ar for the AR objective)"
            )
        if target in _OUR_BUILDERS:
            if target not in self.builders:
                raise RecipeConfigError(
                    f"model._target_={_target_name(target)} does not fit the {self.objective!r} objective of "
                    f"{type(self).__name__}; use {' or '.join(_target_name(b) for b in self.builders)}"
                )
            if not (target is build_qwen3_vl_ar and cfg.get("model.tiny", None) is not None):
                try:
                    local = check_model_path(cfg.get("model.pretrained_model_name_or_path", None))
                    if local is not None:
                        check_model_type(local, "bard_vl" if target is build_bard_vl else "qwen3_vl")
                except ModelConfigError as exc:
                    raise RecipeConfigError(str(exc)) from None
        if cfg.get("dataset", None) is None:
            raise RecipeConfigError("the recipe YAML has no `dataset:` section (e.g. ChatDataset or shapes_dataset)")
        collate = cfg.get("dataloader.collate_fn", None)
        collate_target = collate.get("_target_", None) if hasattr(collate, "get") else collate
        if collate_target is None or _target_name(collate_target) != self.collate_fn_name:
            raise RecipeConfigError(
                f"dataloader.collate_fn must be {self.collate_fn_name} for {type(self).__name__} "
                f"(got {_target_name(collate_target)}); NeMo's default VLM collators shift labels for AR training"
            )
        bard = cfg.get("bard", None)
        if bard is not None:
            known = _BARD_KEYS | set(getattr(self, "extra_bard_keys", ()))
            unknown = sorted(set(bard.to_dict()) - known)
            if unknown:
                raise RecipeConfigError(f"unknown key(s) in the `bard:` section: {unknown}; known: {sorted(known)}")
        stop = cfg.get("bard.stop_after_steps", None)
        if stop is not None and (not isinstance(stop, int) or stop < 1):
            raise RecipeConfigError(f"bard.stop_after_steps must be a positive integer, got {stop!r}")
        if cfg.get("checkpoint.checkpoint_dir", None) is None:
            raise RecipeConfigError("checkpoint.checkpoint_dir is not set (where checkpoints and the export go)")
        self._clamp_warmup()

    def _clamp_warmup(self) -> None:
        """A warm-up at least as long as the run (e.g. a short test run of a long recipe) makes NeMo's
        scheduler assert; shorten it to a tenth of the run, with a warning."""
        warmup = self.cfg.get("lr_scheduler.lr_warmup_steps", None)
        max_steps = self.cfg.get("step_scheduler.max_steps", None)
        decay = self.cfg.get("lr_scheduler.lr_decay_steps", None) or max_steps
        if isinstance(warmup, int) and isinstance(decay, int) and warmup >= decay:
            new = decay // 10
            logger.warning("lr_scheduler.lr_warmup_steps=%d >= %d decay steps: using %d", warmup, decay, new)
            self.cfg.set_by_dotted("lr_scheduler.lr_warmup_steps", new)

    def setup(self) -> None:
        """NeMo's ``setup()`` plus the Bard-VL pieces (collators, stage metadata, parameter groups)."""
        check_nemo_compat()
        self.validate_config()
        try:  # Energon data: the recipe's loaders read shards (recipes/energon_loader.py)
            if install_stream_dataloaders(self.cfg):
                self._clamp_warmup()  # max_steps may have just been derived from the epochs
        except ValueError as exc:
            raise RecipeConfigError(str(exc)) from None
        with cpu_cuda_guard(), accept_custom_model_targets():
            super().setup()
        if self.dist_env.device is None:  # initialize_distributed leaves it unset without CUDA
            self.dist_env.device = torch.device("cpu")
        self.stop_after_steps = self.cfg.get("bard.stop_after_steps", None)
        self._samples_trained = 0.0
        self._steps_this_run = 0
        self._last_checkpoint: Optional[str] = None
        self._stopped_early = False
        self.stop_signal: Optional[int] = None
        self._watch_stop_signals()
        self._quiet_dataloader_workers()
        self._group_kinds = self._classify_param_groups()
        self._install_collators()
        self._mirror_wrapper_attributes()
        self._prepare_model(self._unwrapped_model())

    def _watch_stop_signals(self) -> None:
        """Record which signal stops the run (``stop_signal``), log it when it arrives, and pass it on to NeMo's
        preemption handler (which makes the step scheduler checkpoint the current step and leave the loop).
        Nothing is installed when ``step_scheduler.preemption_signal`` is ``None``. A stale :data:`STOP_MARKER`
        from an earlier stopped run is removed."""
        marker = Path(self.checkpointer.config.checkpoint_dir) / STOP_MARKER
        if self.dist_env.is_main and marker.is_file():
            marker.unlink()
        handler = getattr(self.step_scheduler, "sig_handler", None)
        if handler is None:
            return
        for sig in getattr(handler, "sigs", ()):
            nemo_handler = signal.getsignal(sig)
            if not callable(nemo_handler):
                continue

            def on_signal(signum: int, frame: Any, _nemo: Any = nemo_handler) -> None:
                if self.stop_signal is None:
                    self.stop_signal = signum
                    logger.warning("%s received: checkpointing at the end of step %d and stopping",
                                   signal.Signals(signum).name, self.step_scheduler.step)
                _nemo(signum, frame)

            signal.signal(sig, on_signal)

    def _quiet_dataloader_workers(self) -> None:
        """Data-loader worker processes ignore :data:`STOP_SIGNALS`: a signal sent to the trainer's whole process
        group (torchrun's way of stopping a rank, a terminal's Ctrl-C) must not kill them while the trainer still
        needs a clean end of step and a checkpoint. They end when the trainer does."""
        for name in ("dataloader", "val_dataloader"):
            loader = getattr(self, name, None)
            if loader is not None and getattr(loader, "num_workers", 0) and hasattr(loader, "worker_init_fn"):
                loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)

    def _unwrapped_model(self) -> torch.nn.Module:
        model = self.model_parts[0]
        return getattr(model, "module", model)

    def _mirror_wrapper_attributes(self) -> None:
        """DDP / megatron-FSDP wrap the model in another module (FSDP2 does not): copy the attributes
        the loss reads from the model (``uses_flex_attention``) onto the wrapper."""
        wrapper, inner = self.model_parts[0], self._unwrapped_model()
        if wrapper is inner:
            return
        for name in ("uses_flex_attention",):
            if hasattr(inner, name) and name not in wrapper.__dict__:
                setattr(wrapper, name, getattr(inner, name))

    def _classify_param_groups(self) -> list[list[set[str]]]:
        """For each optimizer and parameter group, the kinds (language / merger / vision) it holds."""
        names = {}
        for part in self.model_parts:
            for name, param in part.named_parameters():
                names[id(param)] = name
        return [
            [{param_group_kind(names[id(p)]) for p in group["params"] if id(p) in names} for group in opt.param_groups]
            for opt in self.optimizer
        ]

    def _collate_defaults(self) -> dict:
        return {}

    def _install_collators(self) -> None:
        """Swap NeMo's bound ``partial(collate_fn, processor=...)`` for the collator object itself, so
        that ``StepScheduler.set_epoch`` reaches it (the noise is seeded by the epoch)."""
        defaults = self._collate_defaults()
        train = resolve_collate(self.dataloader.collate_fn, **defaults)
        if train is None:
            raise RecipeConfigError(f"dataloader.collate_fn must be {self.collate_fn_name}")
        self.dataloader.collate_fn = train
        self.train_collator = train
        if self.val_dataloader is not None:
            val = resolve_collate(self.val_dataloader.collate_fn, **self._validation_collate_defaults(train))
            if val is None:
                raise RecipeConfigError(f"validation_dataloader.collate_fn must be {self.collate_fn_name}")
            self.val_dataloader.collate_fn = val

    def _validation_collate_defaults(self, train: Any) -> dict:
        return self._collate_defaults()

    def _prepare_model(self, model: torch.nn.Module) -> None:
        """Stage-specific edits of the model's config / generation config before any checkpoint."""

    # ------------------------------------------------------------------ objective hooks
    def _local_counts(self, batch: dict) -> dict[str, float]:
        """Local tallies of one micro-batch (summed over the optimizer step and all DP ranks):
        must hold :attr:`denominator_key`, ``tokens`` (non-padding tokens, for tokens/s) and
        ``loss_tokens``."""
        raise NotImplementedError

    def _compute_loss(self, model: torch.nn.Module, batch: dict, denominator: float) -> tuple[torch.Tensor, dict]:
        """``(loss, sums)``: the micro-batch loss divided by ``denominator``, and detached sums of
        per-position statistics (``ce_sum``, ``correct``) over its loss positions."""
        raise NotImplementedError

    def _extra_metrics(self, totals: dict[str, float]) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ step
    def _to_device(self, batch: dict) -> dict:
        device = self.dist_env.device
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _forward_backward_step(
        self,
        idx: int,
        batch: dict,
        *,
        loss_buffer: list,
        denominator: float,
        num_batches: int,
        is_train: bool = True,
        stat_buffer: Optional[list] = None,
    ) -> None:
        """One micro-batch: loss normalised by the global ``denominator`` count (for PBM: the
        number of samples in the optimizer step), backward scaled by the DP size (FSDP/DDP average
        gradients over ranks, so the sum over ranks is restored)."""
        batch = self._to_device(batch)
        model = self.model_parts[0]
        sync_ctx = (
            get_sync_ctx(
                model,
                idx == num_batches - 1,
                defer_fsdp_grad_sync=getattr(self.distributed_config, "defer_fsdp_grad_sync", True),
            )
            if is_train
            else nullcontext()
        )
        with sync_ctx, self._autocast_context():
            loss, sums = self._compute_loss(model, batch, float(denominator))
            loss_buffer.append(loss.detach().float().clone())
            if stat_buffer is not None:
                stat_buffer.append(sums)
            if is_train:
                (loss * self._get_dp_group_size(include_cp=True)).backward()

    def _allreduce_sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64)
        return self._dp_allreduce(tensor, include_cp=True).tolist()

    def _run_train_optim_step(self, batches: list, max_grad_norm: Optional[float] = None) -> MetricsSample:
        """One optimizer step over the micro-batches ``batches`` (gradient accumulation)."""
        counts = [self._local_counts(batch) for batch in batches]
        keys = sorted({k for c in counts for k in c})
        global_counts = dict(zip(keys, self._allreduce_sum([sum(c.get(k, 0.0) for c in counts) for k in keys])))
        denominator = global_counts[self.denominator_key]
        self._check_usable_samples(batches, global_counts)
        num_batches = len(batches)
        loss_buffer: list[torch.Tensor] = []
        stat_buffer: list[dict] = []

        prepare_for_grad_accumulation(self.model_parts, pp_enabled=False)
        for i, batch in enumerate(batches):
            if i == num_batches - 1:
                prepare_for_final_backward(self.model_parts, pp_enabled=False)
            self._forward_backward_step(
                i,
                batch,
                loss_buffer=loss_buffer,
                denominator=max(denominator, 1.0),
                num_batches=num_batches,
                stat_buffer=stat_buffer,
            )
            if i == 0:
                prepare_after_first_microbatch()

        synchronize_tp_replica_gradients(self.model_parts, self.device_mesh)
        grad_norm = scale_grads_and_clip_grad_norm(
            max_grad_norm=max_grad_norm,
            model_parts=self.model_parts,
            norm_type=2.0,
            pp_enabled=False,
            device_mesh=self.device_mesh,
            moe_mesh=self.moe_mesh,
            foreach=True,
            num_label_tokens=int(denominator),
            dp_group_size=self._get_dp_group_size(include_cp=True),
            grad_norm_backend=self.cfg.get("clip_grad_norm.backend", "triton"),
        )
        self.checkpointer.maybe_wait_for_staging()
        for opt in self.optimizer:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            for scheduler in self.lr_scheduler:  # once per optimizer step
                scheduler.step(1)

        now = time.perf_counter()
        elapsed = max(now - self.timestamp, 1e-9)
        self.timestamp = now
        local = [
            float(sum(t.item() for t in loss_buffer)),
            float(sum(float(s.get("ce_sum", 0.0)) for s in stat_buffer)),
            float(sum(float(s.get("correct", 0.0)) for s in stat_buffer)),
            _host_peak_rss_gib(),
        ]
        loss_sum, ce_sum, correct, rss_sum = self._allreduce_sum(local)
        loss_tokens = max(global_counts.get("loss_tokens", 0.0), 1.0)
        tps = global_counts.get("tokens", 0.0) / elapsed
        dp = max(self._get_dp_group_size(), 1)
        metrics: dict[str, Any] = {
            "loss": loss_sum,
            "grad_norm": float(grad_norm) if isinstance(grad_norm, torch.Tensor) else float(grad_norm or 0.0),
            **self._learning_rates(),
            "mem": torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else 0.0,
            "tps": tps,
            "tps_per_gpu": tps / dp,
            "num_tokens_per_step": int(global_counts.get("tokens", 0.0)),
            "num_label_tokens": int(global_counts.get("loss_tokens", 0.0)),
            "num_samples": int(global_counts.get("samples", 0.0)),
            "num_skipped": int(global_counts.get("skipped", 0.0)),
            "ce": ce_sum / loss_tokens,
            "accuracy": correct / loss_tokens,
            "step_time": elapsed,
            # host memory (the CPU runs' peak memory): this rank's peak resident set so far, and the sum over ranks
            "host_peak_rss_gib": local[-1],
            "host_peak_rss_sum_gib": rss_sum,
        }
        metrics.update(self._extra_metrics(global_counts))

        step = self.step_scheduler.step
        if self.stop_after_steps is not None and step + 1 >= self.stop_after_steps and step + 1 < self.step_scheduler.max_steps:
            # Stop like a preemption: NeMo then checkpoints this step and leaves the loop.
            logger.info("bard.stop_after_steps=%d reached: checkpointing and stopping", self.stop_after_steps)
            self.step_scheduler.sigterm_flag = True
            self._stopped_early = True
        return MetricsSample(step=step, epoch=self.step_scheduler.epoch, metrics=metrics)

    def _check_usable_samples(self, batches: list, global_counts: dict[str, float]) -> None:
        """Stop (raise :class:`NoUsableSamplesError`, nothing exported, the stage not done) when the first
        :data:`NO_SAMPLE_STEPS` optimizer steps of this run (or all of a shorter run) had no usable sample."""
        self._samples_trained += float(global_counts.get("samples", 0.0))
        self._steps_this_run += 1
        max_steps = int(self.step_scheduler.max_steps or NO_SAMPLE_STEPS)
        if self._samples_trained > 0 or self._steps_this_run < min(NO_SAMPLE_STEPS, max_steps):
            return
        reasons = [f"record {index}: {reason}" for batch in batches for index, reason in (batch.get("skipped") or [])]
        skipped = int(global_counts.get("skipped", 0.0))
        raise NoUsableSamplesError(
            f"{self._steps_this_run} optimizer steps without a single usable training sample ({skipped} skipped in "
            f"the last step{': ' + '; '.join(reasons[:3]) if reasons else ''}); check the dataset path, root and "
            "records -- nothing was exported"
        )

    def _learning_rates(self) -> dict[str, float]:
        """``lr`` (first group, as NeMo logs it) and ``lr_language`` / ``lr_merger`` / ``lr_vision``."""
        out: dict[str, float] = {"lr": float(self.optimizer[0].param_groups[0]["lr"])}
        for opt, kinds in zip(self.optimizer, self._group_kinds):
            for group, group_kinds in zip(opt.param_groups, kinds):
                for kind in sorted(group_kinds):
                    out.setdefault(f"lr_{kind}", float(group["lr"]))
        return out

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _run_validation_epoch(self, val_dataloader: Iterable) -> MetricsSample:
        """Mean validation loss over all ranks (same normalisation as training)."""
        with ScopedRNG(seed=1, ranked=True):
            for part in self.model_parts:
                part.eval()
            totals = {"loss": 0.0, "count": 0.0, "loss_tokens": 0.0, "ce_sum": 0.0, "correct": 0.0}
            for batch in val_dataloader:
                counts = self._local_counts(batch)
                loss_buffer: list[torch.Tensor] = []
                stat_buffer: list[dict] = []
                self._forward_backward_step(
                    0, batch, loss_buffer=loss_buffer, denominator=1.0, num_batches=1, is_train=False,
                    stat_buffer=stat_buffer,
                )  # fmt: skip
                totals["loss"] += float(loss_buffer[-1])
                totals["count"] += counts[self.denominator_key]
                totals["loss_tokens"] += counts.get("loss_tokens", 0.0)
                totals["ce_sum"] += float(stat_buffer[-1].get("ce_sum", 0.0))
                totals["correct"] += float(stat_buffer[-1].get("correct", 0.0))
        keys = sorted(totals)
        totals = dict(zip(keys, self._allreduce_sum([totals[k] for k in keys])))
        loss_tokens = max(totals["loss_tokens"], 1.0)
        return MetricsSample(
            step=self.step_scheduler.step,
            epoch=self.step_scheduler.epoch,
            metrics={
                "val_loss": totals["loss"] / max(totals["count"], 1.0),
                "val_ce": totals["ce_sum"] / loss_tokens,
                "val_accuracy": totals["correct"] / loss_tokens,
                "lr": float(self.optimizer[0].param_groups[0]["lr"]),
                "num_label_tokens": int(totals["loss_tokens"]),
                "mem": torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else 0.0,
            },
        )

    # ------------------------------------------------------------------ logging
    def _progress_bar_enabled(self) -> bool:
        setting = self.cfg.get("bard.progress_bar", "auto")
        if isinstance(setting, bool):
            return setting
        return bool(getattr(sys.stderr, "isatty", lambda: False)())

    def _make_progress_bar(self, total: Optional[int] = None, initial: int = 0):
        """A tqdm bar on rank 0, only on an interactive terminal unless ``bard.progress_bar: true``."""
        if not self._progress_bar_enabled():
            return None
        return super()._make_progress_bar(total, initial)

    def log_train_metrics(self, log_data: MetricsSample) -> None:
        """JSONL always (``<checkpoint_dir>/training.jsonl``); W&B / MLflow when configured; one log line."""
        if not self.dist_env.is_main:
            return
        if self.step_scheduler.is_remote_logging_step:
            if _HAS_WANDB and wandb.run is not None:
                wandb.log(log_data.to_dict(), step=self.step_scheduler.step)
            if _HAS_MLFLOW and mlflow.active_run() is not None:
                from nemo_automodel.components.loggers.mlflow_utils import to_float_metrics

                mlflow.log_metrics(to_float_metrics(log_data.to_dict()), step=self.step_scheduler.step)
        self.metric_logger_train.log(log_data)
        m = log_data.metrics
        extra = "".join(f" | {k} {m[k]:.3f}" for k in ("mask_fraction",) if k in m)
        extra += f" | block_size {m['block_size']}" if "block_size" in m else ""
        logging.info(
            "[%s] step %d | epoch %d | loss %.4f | acc %.3f | grad_norm %.4f | lr %.2e%s | tps %.1f | samples %d%s",
            self.objective, log_data.step, log_data.epoch, m["loss"], m["accuracy"], m["grad_norm"], m["lr"],
            "".join(f" | {k} {v:.2e}" for k, v in m.items() if k.startswith("lr_") and k != "lr_language"),
            m["tps"], m["num_samples"], extra,
        )  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    # ------------------------------------------------------------------ checkpoint / export
    def load_checkpoint(self, restore_from: str | None = None) -> None:
        """NeMo's resume, made robust to a damaged checkpoint: when resuming automatically (no
        ``checkpoint.restore_from``), a latest checkpoint that cannot be read -- files missing or corrupt although
        no interrupted-save marker says so -- is reported, renamed aside (``<name>.unreadable-<time>``) and the next
        older one is resumed (the steps after it are trained again, exactly as before). When no checkpoint can be
        read, the run stops with each one's problem and nothing is renamed."""
        if restore_from or not self.checkpointer.config.enabled:
            return super().load_checkpoint(restore_from)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        from nemo_automodel.components.checkpoint.utils import (
            find_latest_checkpoint,
            is_checkpoint_incomplete,
            list_automodel_checkpoints,
        )

        root = Path(self.checkpointer.config.checkpoint_dir)
        latest = find_latest_checkpoint(root)
        if latest is None:
            return super().load_checkpoint(None)
        latest = Path(str(latest))
        older = [c for c in reversed(list_automodel_checkpoints(root))
                 if not is_checkpoint_incomplete(c) and _checkpoint_step(c) < _checkpoint_step(latest)]
        failures: list[tuple[Path, str]] = []
        for candidate in [latest, *older]:
            problem = checkpoint_problem(candidate)
            if problem is None:
                try:  # the latest one through NeMo's own choice (it skips an incompatible model config)
                    super().load_checkpoint(None if candidate == latest else str(candidate))
                except (Exception, CheckpointException) as exc:  # noqa: BLE001 - unreadable: try the previous one
                    problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                for failed, why in failures:
                    logger.warning("checkpoint %s cannot be resumed (%s); kept as %s, resumed from %s instead",
                                   failed, why, _set_aside(failed), candidate)
                return None
            failures.append((candidate, problem))
        listing = "; ".join(f"{path.name}: {why}" for path, why in failures)
        raise RuntimeError(f"no checkpoint under {root} can be resumed ({listing}); move them away to start over")

    def save_checkpoint(self, epoch: int, step: int, train_loss: float, val_loss: Optional[dict] = None,
                        best_metric_key: str = "default") -> None:  # fmt: skip
        # the logs up to this step reach the disk with the checkpoint: a run killed later and resumed from
        # here keeps every step of its training.jsonl (NeMo buffers 100 records)
        for name in ("metric_logger_train", "metric_logger_valid"):
            logger_ = getattr(self, name, None)
            if logger_ is not None and hasattr(logger_, "flush"):
                logger_.flush()
        super().save_checkpoint(epoch, step, train_loss, val_loss, best_metric_key=best_metric_key)
        if self.checkpointer.config.enabled:
            self._last_checkpoint = os.path.join(self.checkpointer.config.checkpoint_dir, f"epoch_{epoch}_step_{step}")

    def run_train_validation_loop(self) -> None:
        """NeMo's training loop, then the export pointer (``<checkpoint_dir>/final``, ``export.json``)."""
        super().run_train_validation_loop()
        if self._stopped_early or self.step_scheduler.sigterm_flag:
            if self.dist_env.is_main:
                why = "bard.stop_after_steps" if self._stopped_early else (
                    signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a stop signal")
                logger.info(
                    "stopped at step %d before the end (%s); checkpoint %s, no export written -- rerun the same "
                    "command to resume",
                    self.step_scheduler.step, why, self._last_checkpoint,
                )
                if not self._stopped_early:
                    self._write_stop_marker()
            return
        self._write_export_pointer()

    def _write_stop_marker(self) -> None:
        """``<checkpoint_dir>/stopped.json``: the signal that stopped this run, the steps done, the checkpoint."""
        info = {
            "signal": signal.Signals(self.stop_signal).name if self.stop_signal is not None else None,
            "steps": int(self.step_scheduler.step),
            "checkpoint": self._last_checkpoint,
        }
        marker = Path(self.checkpointer.config.checkpoint_dir) / STOP_MARKER
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(info, indent=2) + "\n")

    def _final_consolidated(self) -> Optional[Path]:
        candidates = []
        if self._last_checkpoint is not None:
            candidates.append(Path(self._last_checkpoint))
        candidates.append(Path(self.checkpointer.config.checkpoint_dir) / "LATEST")
        for ckpt in candidates:
            consolidated = ckpt / "model" / "consolidated"
            if (consolidated / "config.json").is_file():
                return consolidated.resolve()
        return None

    def _export_metadata(self) -> dict:
        return {"objective": self.objective, "recipe": f"{type(self).__module__}.{type(self).__name__}"}

    def _write_export_pointer(self) -> None:
        if not self.checkpointer.config.enabled:
            logger.warning("checkpoint.enabled is false: no model export was written")
            return
        if getattr(self, "peft_config", None) is not None:
            self._write_peft_exports()
            return
        if self.dist_env.is_main:
            consolidated = self._final_consolidated()
            ckpt_dir = Path(self.checkpointer.config.checkpoint_dir)
            if consolidated is None:
                logger.warning(
                    "no consolidated Hugging Face export found under %s (checkpoint.save_consolidated must be "
                    "'final' or true); the next stage cannot load this run",
                    ckpt_dir,
                )
            else:
                self._complete_export(consolidated)
                link = ckpt_dir / "final"
                if link.is_symlink() or link.exists():
                    link.unlink()
                os.symlink(os.path.relpath(consolidated, ckpt_dir.resolve()), link, target_is_directory=True)
                step_dir = consolidated.parent.parent.name
                info = {
                    "model_dir": str(consolidated),
                    "final": str(link),
                    "checkpoint": step_dir,
                    "steps": int(self.step_scheduler.step),
                    "epoch": int(self.step_scheduler.epoch),
                    **self._export_metadata(),
                }
                (ckpt_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
                logger.info("model export: %s -> %s", link, consolidated)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _complete_export(self, consolidated: Path) -> None:
        """Make sure the export is a complete model directory (processor / tokenizer files)."""
        has_tokenizer = any((consolidated / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        if not has_tokenizer and self.processor is not None:
            self.processor.save_pretrained(str(consolidated))
        elif not has_tokenizer:
            logger.warning("%s has no tokenizer files and the run has no processor", consolidated)

    # ------------------------------------------------------------------ LoRA / PEFT exports
    def _peft_base_dir(self) -> Path:
        """The local directory of the model the adapters were trained on (``model.pretrained_model_name_or_path``;
        a hub id resolves to its downloaded snapshot)."""
        name = str(self.cfg.get("model.pretrained_model_name_or_path", None))
        local = Path(name).expanduser()
        if local.is_dir():
            return local.resolve()
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - reported with the key that names it
            raise RecipeConfigError(
                f"model.pretrained_model_name_or_path={name!r}: the LoRA export needs the base weights on disk ({exc})"
            ) from None

    def _write_peft_exports(self) -> None:
        """A LoRA run's exports (:mod:`nemo_automodel_bard.recipes.peft_export`): ``<checkpoint_dir>/final`` -> the
        merged Bard-VL directory (what the next stage loads), ``<checkpoint_dir>/adapter`` -> the adapter directory
        in the ``peft`` format, both built on rank 0 from the last checkpoint's adapter and the base directory."""
        from nemo_automodel_bard.recipes.peft_export import ADAPTER_WEIGHTS, merge_lora_into_base, write_adapter_dir

        if self.dist_env.is_main:
            ckpt_dir = Path(self.checkpointer.config.checkpoint_dir)
            candidates = ([Path(self._last_checkpoint)] if self._last_checkpoint is not None else []) + [ckpt_dir / "LATEST"]
            saved = next((c.resolve() / "model" for c in candidates if (c / "model" / ADAPTER_WEIGHTS).is_file()), None)
            if saved is None:
                raise RuntimeError(f"a LoRA run ended without an adapter checkpoint under {ckpt_dir} "
                                   f"(no model/{ADAPTER_WEIGHTS}); no export was written")
            step_dir = saved.parent.name
            base = self._peft_base_dir()
            export = ckpt_dir.resolve() / "peft_export" / step_dir
            merged, adapter = export / "merged", export / "adapter"
            for path in (merged, adapter):
                if path.exists():
                    shutil.rmtree(path)
            merge_lora_into_base(base, saved, merged)
            model = self._unwrapped_model()
            model.config.save_pretrained(str(merged))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(merged))
            for path in sorted(base.iterdir()):  # processor / tokenizer files the processor does not write itself
                if path.is_file() and not (merged / path.name).exists() and path.suffix in (".json", ".jinja", ".txt"):
                    shutil.copyfile(path, merged / path.name)
            self._complete_export(merged)
            write_adapter_dir(saved, adapter, str(base), extra_files_from=merged)
            for name, target in (("final", merged), ("adapter", adapter)):
                link = ckpt_dir / name
                if link.is_symlink() or link.exists():
                    link.unlink()
                os.symlink(os.path.relpath(target, ckpt_dir.resolve()), link, target_is_directory=True)
            info = {
                "model_dir": str(merged),
                "final": str(ckpt_dir / "final"),
                "adapter_dir": str(adapter),
                "base_model": str(base),
                "checkpoint": step_dir,
                "steps": int(self.step_scheduler.step),
                "epoch": int(self.step_scheduler.epoch),
                **self._export_metadata(),
            }
            (ckpt_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
            logger.info("LoRA exports: merged %s, adapter %s (base %s)", merged, adapter, base)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

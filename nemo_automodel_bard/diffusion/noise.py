"""Noise schedules, stratified block times and response corruption for block diffusion.

Convention used everywhere in this package: ``t`` is the *corruption level* in ``(0, 1]``, the
probability that a token is corrupted; ``t = 1`` means fully corrupted. A schedule maps a diffusion
time ``s`` in ``[0, 1]`` to ``t`` and gives the MDLM ELBO weight ``(dt/ds) / t`` of that time.

This module depends on torch and the standard library only.
"""

from __future__ import annotations

import enum
import hashlib
import math
from typing import Any, Iterable, Optional, Protocol, Union, runtime_checkable

import torch

__all__ = [
    "NoiseSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "SCHEDULES",
    "get_schedule",
    "stratified_times",
    "sample_block_levels",
    "check_level_range",
    "NoiseMode",
    "mix_probabilities",
    "corrupt_response",
    "sample_generator",
    "ordinary_token_ids",
]

_MIX_FLOOR = 1e-3


@runtime_checkable
class NoiseSchedule(Protocol):
    """Maps time ``s`` to corruption level ``t`` and gives the ELBO loss weight at ``s``."""

    name: str

    def level(self, s: torch.Tensor) -> torch.Tensor:
        """Corruption level ``t`` (same shape as ``s``)."""
        ...

    def loss_weight(self, s: torch.Tensor) -> torch.Tensor:
        """MDLM ELBO weight ``(dt/ds) / t`` (same shape as ``s``)."""
        ...


class LinearSchedule:
    """CondOT / linear schedule: ``t = s``, weight ``1 / t``."""

    name = "linear"

    def level(self, s: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(s).clone()

    def loss_weight(self, s: torch.Tensor) -> torch.Tensor:
        return 1.0 / torch.as_tensor(s)

    def __repr__(self) -> str:
        return "LinearSchedule()"


class CosineSchedule:
    """Cosine schedule: ``t = 1 - cos(pi s / 2)``, weight ``(pi/2) sin(pi s / 2) / t``."""

    name = "cosine"

    def level(self, s: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * torch.as_tensor(s))

    def loss_weight(self, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s)
        dt_ds = 0.5 * math.pi * torch.sin(0.5 * math.pi * s)
        return dt_ds / self.level(s)

    def __repr__(self) -> str:
        return "CosineSchedule()"


class PolynomialSchedule:
    """Polynomial schedule: ``t = s ** p``, weight ``p / s``."""

    name = "polynomial"

    def __init__(self, exponent: float = 2.0) -> None:
        if exponent <= 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)

    def level(self, s: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(s) ** self.exponent

    def loss_weight(self, s: torch.Tensor) -> torch.Tensor:
        return self.exponent / torch.as_tensor(s)

    def __repr__(self) -> str:
        return f"PolynomialSchedule(exponent={self.exponent})"


SCHEDULES: dict[str, type] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "polynomial": PolynomialSchedule,
}
_ALIASES = {"condot": "linear"}


def get_schedule(name: str, **kw) -> NoiseSchedule:
    """Build a schedule by name (``"linear"`` (alias ``"condot"``), ``"cosine"``, ``"polynomial"``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    return SCHEDULES[key](**kw)


def stratified_times(num_blocks: int, generator: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """Stratified diffusion times for the ``N`` response blocks of one sample.

    ``s_i = (u_i + i) / N`` with ``u_i ~ U(0, 1)``, randomly permuted across blocks and clamped to
    ``[eps, 1]``; exactly one time falls in each stratum ``[i/N, (i+1)/N)``.

    Returns:
        float32 ``[N]``.
    """
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if num_blocks == 0:
        return torch.zeros(0, dtype=torch.float32)
    u = torch.rand(num_blocks, generator=generator, dtype=torch.float64)
    s = (u + torch.arange(num_blocks, dtype=torch.float64)) / num_blocks
    s = s[torch.randperm(num_blocks, generator=generator)]
    return s.clamp(eps, 1.0).to(torch.float32)


def sample_block_levels(
    num_blocks: int,
    generator: torch.Generator,
    schedule: Optional[NoiseSchedule] = None,
    eps: float = 1e-3,
    level_range: Optional[tuple[float, float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified per-block corruption levels and their ELBO loss weights.

    ``level_range = (lo, hi)`` maps the levels affinely into ``[lo, hi]`` (``lo + (hi - lo) * t``; the published
    SWD recipe masks 10-50 % of a block); the weights are then ``1 / level``. ``None``: the full range.

    Returns:
        ``(levels [N], weights [N])`` float32, ``levels = schedule.level(s)``,
        ``weights = schedule.loss_weight(s)`` (default schedule: linear).
    """
    schedule = schedule if schedule is not None else LinearSchedule()
    s = stratified_times(num_blocks, generator, eps)
    levels, weights = schedule.level(s).to(torch.float32), schedule.loss_weight(s).to(torch.float32)
    if level_range is not None:
        lo, hi = check_level_range(level_range)
        levels = (lo + (hi - lo) * levels).to(torch.float32)
        weights = 1.0 / levels
    return levels, weights


def check_level_range(level_range: Any) -> tuple[float, float]:
    """``(lo, hi)`` as floats with ``0 < lo <= hi <= 1``; a ``ValueError`` naming the value otherwise."""
    try:
        lo, hi = (float(v) for v in level_range)
    except (TypeError, ValueError):
        raise ValueError(f"level_range must be two numbers [lo, hi], got {level_range!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"level_range must satisfy 0 < lo <= hi <= 1, got {level_range!r}")
    return lo, hi


class NoiseMode(str, enum.Enum):
    """How a corrupted token is replaced."""

    MASK = "mask"
    UNIFORM = "uniform"
    MIX = "mix"


def mix_probabilities(t: torch.Tensor) -> torch.Tensor:
    """Mixed-noise operation probabilities at corruption level ``t``.

    With ``phi = pi t / 2`` the weights ``[1 - cos phi, sin phi + cos phi - 1, 1 - sin phi]`` are each
    clamped to ``>= 0.001`` and normalised.

    Returns:
        ``[..., 3]`` (same float dtype as ``t``; columns = mask, substitute, keep).
    """
    t = torch.as_tensor(t)
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    phi = 0.5 * math.pi * t
    cos, sin = torch.cos(phi), torch.sin(phi)
    w = torch.stack([1.0 - cos, sin + cos - 1.0, 1.0 - sin], dim=-1).clamp_min(_MIX_FLOOR)
    return w / w.sum(dim=-1, keepdim=True)


def corrupt_response(
    clean: torch.Tensor,
    block_size: int,
    levels: torch.Tensor,
    mode: Union[NoiseMode, str],
    mask_token_id: int,
    substitution_ids: Optional[torch.Tensor],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a (block-padded) response block by block.

    Args:
        clean: int ``[R]``, ``R`` a multiple of ``block_size``.
        levels: ``[R // block_size]`` corruption level of each block.
        mode: ``mask`` (token -> ``mask_token_id`` with probability ``t``), ``uniform`` (token -> a random
            id from ``substitution_ids`` with probability ``t``; it may equal the clean token and still
            counts as corrupted) or ``mix`` (mask / substitute / keep per :func:`mix_probabilities`).
        substitution_ids: int ``[K]`` ids allowed for random substitution (needed by uniform / mix).
        generator: CPU generator; the result is a deterministic function of its state.

    Returns:
        ``(noisy [R] same dtype/device as clean, corrupted [R] bool)``. At least one position is
        corrupted whenever ``R > 0`` (one position is forced if the draw corrupted none).
    """
    mode = NoiseMode(mode)
    clean = torch.as_tensor(clean)
    if clean.dim() != 1:
        raise ValueError(f"clean must be 1-D [R], got shape {tuple(clean.shape)}")
    length = clean.numel()
    levels = torch.as_tensor(levels, dtype=torch.float64).reshape(-1).cpu()
    if block_size <= 0 or length != block_size * levels.numel():
        raise ValueError(
            f"clean has {length} tokens but {levels.numel()} block levels x block_size {block_size} "
            f"= {block_size * levels.numel()}"
        )
    out_device = clean.device
    if length == 0:
        return clean.clone(), torch.zeros(0, dtype=torch.bool, device=out_device)
    needs_subs = mode in (NoiseMode.UNIFORM, NoiseMode.MIX)
    if needs_subs:
        if substitution_ids is None or torch.as_tensor(substitution_ids).numel() == 0:
            raise ValueError(f"noise mode {mode.value!r} needs a non-empty substitution_ids tensor")
        subs = torch.as_tensor(substitution_ids, dtype=torch.int64).reshape(-1).cpu()

    src = clean.cpu().to(torch.int64)
    t_tok = levels.repeat_interleave(block_size)  # [R]
    u = torch.rand(length, generator=generator, dtype=torch.float64)
    if mode is NoiseMode.MIX:
        probs = mix_probabilities(t_tok)  # [R, 3]
        cum = probs.cumsum(dim=-1)
        op = (u >= cum[:, 0]).to(torch.int64) + (u >= cum[:, 1]).to(torch.int64)  # 0 mask, 1 sub, 2 keep
        is_mask, is_sub = op == 0, op == 1
    else:
        corrupted = u < t_tok
        is_mask = corrupted if mode is NoiseMode.MASK else torch.zeros_like(corrupted)
        is_sub = corrupted if mode is NoiseMode.UNIFORM else torch.zeros_like(corrupted)
    replacement = subs[torch.randint(subs.numel(), (length,), generator=generator)] if needs_subs else None

    if not bool((is_mask | is_sub).any()):
        pos = int(torch.randint(length, (1,), generator=generator))
        if mode is NoiseMode.MASK:
            is_mask[pos] = True
        elif mode is NoiseMode.UNIFORM:
            is_sub[pos] = True
        else:  # choose mask vs substitute with their relative probabilities at this level
            p = probs[pos]
            p_mask = float(p[0] / (p[0] + p[1]))
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < p_mask:
                is_mask[pos] = True
            else:
                is_sub[pos] = True

    noisy = src.clone()
    noisy[is_mask] = int(mask_token_id)
    if needs_subs:
        noisy = torch.where(is_sub, replacement, noisy)
    corrupted = is_mask | is_sub
    return noisy.to(dtype=clean.dtype, device=out_device), corrupted.to(out_device)


def sample_generator(seed: int, epoch: int, sample_index: int) -> torch.Generator:
    """CPU generator seeded from ``(seed, epoch, sample_index)`` with a stable 63-bit blake2b hash.

    Independent of rank count, worker layout and batch composition.
    """
    payload = f"bard-noise:{int(seed)}:{int(epoch)}:{int(sample_index)}".encode()
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    value = int.from_bytes(digest, "little") & ((1 << 63) - 1)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(value)
    return gen


def ordinary_token_ids(vocab_size_limit: int, exclude: Iterable[int] = ()) -> torch.Tensor:
    """Ids in ``[0, vocab_size_limit)`` minus ``exclude`` (int64 ``[K]``).

    For Qwen3-VL, ``vocab_size_limit=151646`` leaves out the vision, tool, think and MASK (151671)
    ids; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (151643-151645) lie below that limit, so
    pass them in ``exclude`` to keep them out too.
    """
    keep = torch.ones(int(vocab_size_limit), dtype=torch.bool)
    excl = torch.as_tensor(list(exclude), dtype=torch.int64)
    excl = excl[(excl >= 0) & (excl < vocab_size_limit)]
    keep[excl] = False
    return torch.nonzero(keep).reshape(-1)

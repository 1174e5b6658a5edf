"""Token choice and unmasking rules for block-diffusion decoding.

Every rule turns the block's logits into (a) a proposed token per position and (b) a score in
``[0, 1]`` (higher = commit sooner), then commits either the ``k`` best-scoring masked positions
(``*_static``), or every masked position scoring above a threshold and at least the ``k`` best
(``*_dynamic``), or (``*_budget``) the best-scoring masked positions as long as their summed doubt
``sum(1 - score)`` stays within ``1 - threshold``, and at least the ``k`` best. With the probability score the
budget bounds the expected number of wrong tokens committed in one step (at threshold 0.9: 0.1), however many
positions are individually above the threshold -- the parallel-decoding failure where several plausible tokens
are committed together. All arithmetic is fp32 and batched; nothing here synchronises with the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

#: score kinds: probability of the chosen token, top-1 minus top-2 probability, exp(-entropy)
SCORES = ("low_confidence", "margin", "entropy", "random")
RULES = (
    "low_confidence_static",
    "low_confidence_dynamic",
    "low_confidence_budget",
    "margin_static",
    "margin_dynamic",
    "entropy_static",
    "entropy_dynamic",
    "random",
)
_ALIASES = {"margin": "margin_dynamic", "entropy": "entropy_dynamic", "random_static": "random"}


@dataclass(frozen=True)
class UnmaskingRule:
    """A parsed rule name: which score to rank by and whether a threshold applies (``dynamic``: each
    position's score against it; ``budget``: the committed positions' summed doubt against ``1 - threshold``)."""

    score: str
    dynamic: bool
    budget: bool = False

    @classmethod
    def parse(cls, name: str) -> "UnmaskingRule":
        """Parse ``low_confidence_static`` etc.; raise ``ValueError`` naming the valid rules."""
        name = _ALIASES.get(name, name)
        if name not in RULES:
            raise ValueError(
                f"unknown remasking_strategy {name!r}; valid: {list(RULES) + sorted(_ALIASES)}"
            )
        if name == "random":
            return cls("random", False)
        score, mode = name.rsplit("_", 1)
        return cls(score, mode in ("dynamic", "budget"), budget=mode == "budget")


def transfer_schedule(block_size: int, denoising_steps: int) -> list[int]:
    """Minimum tokens to commit at each step: an even split of the block over the steps.

    ``denoising_steps`` larger than the block is clamped to the block size (a step that commits
    nothing would be a wasted forward). The counts sum to ``block_size``.
    """
    steps = min(denoising_steps, block_size)
    base, extra = divmod(block_size, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k / nucleus filtering on fp32 logits ``[..., V]`` (filtered entries become ``-inf``)."""
    if top_k and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@functools.lru_cache(maxsize=16)
def _constant(value: float, device: torch.device) -> torch.Tensor:
    """A cached fp32 scalar tensor (``torch.where`` with a tensor operand skips a scalar conversion)."""
    return torch.tensor(value, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=16)
def _suppression_bias(token_id: int, vocab: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[V]``: ``-inf`` at ``token_id``, 0 elsewhere (cached: one add per step instead of a scatter)."""
    if not 0 <= token_id < vocab:
        raise ValueError(f"suppress_token_id={token_id} is outside the vocabulary (size {vocab})")
    bias = torch.zeros(vocab, dtype=torch.float32, device=device)
    bias[token_id] = float("-inf")
    return bias


def propose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    score: str = "low_confidence",
    generator: torch.Generator | None = None,
    suppress_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose a token per position and score it.

    Args:
        logits: ``[batch, B, V]`` (any dtype; converted to fp32).
        suppress_token_id: a vocabulary id that is never proposed (the decoder passes MASK: a
            committed MASK would be indistinguishable from an undecided position).

    Returns:
        ``(tokens [batch, B], score [batch, B] in [0, 1], probability of the chosen token [batch, B])``.
        With ``temperature == 0`` the choice is the argmax; otherwise a sample from the
        temperature / top-k / top-p distribution, under which the probability is measured
        (the confidence of the published rules).
    """
    logits = logits.float()
    if suppress_token_id is not None:
        if torch.compiler.is_compiling():  # a constant of the graph: the same values without the host-side cache
            logits = logits.index_fill(-1, torch.tensor([int(suppress_token_id)], device=logits.device), float("-inf"))
        else:
            logits = logits + _suppression_bias(int(suppress_token_id), logits.shape[-1], logits.device)
    if temperature and temperature > 0:
        logits = filter_logits(logits / temperature, top_k, top_p)
        probs = logits.softmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        chosen = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    else:
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        chosen, tokens = probs.max(-1)
    if score == "low_confidence":
        value = chosen
    elif score == "margin":
        top2 = probs.topk(2, dim=-1).values
        value = top2[..., 0] - top2[..., 1]
    elif score == "entropy":
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        value = torch.exp(-entropy)
    elif score == "random":
        value = torch.rand(chosen.shape, generator=generator, device=chosen.device)
    else:
        raise ValueError(f"unknown score {score!r}; valid: {list(SCORES)}")
    return tokens, value, chosen


def select_commits(
    score: torch.Tensor, masked: torch.Tensor, k: int, *, dynamic: bool, threshold: float, budget: bool = False
) -> torch.Tensor:
    """Which masked positions to commit this step.

    Args:
        score: ``[batch, B]`` scores; masked: ``[batch, B]`` bool (still-masked positions).
        k: minimum number to commit per sample (fewer if fewer remain masked).

    Returns:
        bool ``[batch, B]``: the ``k`` best masked positions (ties: leftmost first), plus (dynamic)
        every masked position whose score is strictly above ``threshold`` — so a threshold >= 1
        on a probability score makes a dynamic rule its static twin; with ``budget`` (and ``dynamic``) instead
        the longest run of best-scoring masked positions whose summed ``1 - score`` is at most
        ``1 - threshold`` (ties: leftmost first; threshold 1: the static twin again).
    """
    if torch.compiler.is_compiling():  # decided positions never rank
        ranked = score.masked_fill(~masked, float("-inf"))
    else:
        ranked = torch.where(masked, score, _constant(float("-inf"), score.device))
    k = min(k, ranked.shape[-1])
    if k > 0:
        # stable sort: among equal scores the leftmost position wins (deterministic, like a Python sort)
        if k == 1:  # argmax returns the first maximal index: same tie rule, one op
            order = ranked.argmax(dim=-1, keepdim=True)
        else:
            order = ranked.argsort(dim=-1, descending=True, stable=True).narrow(-1, 0, k)
        commit = torch.zeros_like(masked).scatter_(-1, order, True) & masked
    else:
        commit = torch.zeros_like(masked)
    if dynamic and budget:
        ordered, order = ranked.sort(dim=-1, descending=True, stable=True)
        doubt = (1.0 - ordered).cumsum(-1)  # -inf scores (decided) give +inf doubt: never within the budget
        within = doubt <= (1.0 - threshold) + 1e-6
        commit = commit | (torch.zeros_like(masked).scatter_(-1, order, within) & masked)
    elif dynamic:
        commit = commit | (ranked > threshold)  # -inf (decided) is never above a finite threshold
    return commit


__all__ = ["RULES", "SCORES", "UnmaskingRule", "filter_logits", "propose_tokens", "select_commits", "transfer_schedule"]

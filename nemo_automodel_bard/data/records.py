"""Chat records as both collators see them: roles, the skip signal and the checks of one sample.

A sample the collators cannot use (a wrong role, special tokens inside an answer, placeholders that do not
match the images, an unreadable image, ...) raises :class:`SampleSkipped` with a readable reason; the
collator drops the sample and counts it (``num_skipped`` and ``skipped`` in the batch), so one bad record
never stops a run and never trains as something else.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

__all__ = [
    "ROLES",
    "SampleSkipped",
    "answer_special_ids",
    "check_answer_tokens",
    "check_media_placeholders",
    "check_prompt_placeholders",
]

#: the roles a chat message may have
ROLES = ("system", "user", "assistant")


class SampleSkipped(Exception):
    """Internal signal: the current sample is unusable; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def answer_special_ids(tokenizer: Any, extra: Sequence[Optional[int]] = ()) -> torch.Tensor:
    """Ids that must never occur inside an answer's text: every special token of ``tokenizer`` (chat
    markers, vision placeholders, MASK, EOS, ...) plus ``extra``; sorted int64 ``[K]``."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
    ids |= {int(i) for i in extra if i is not None}
    return torch.tensor(sorted(ids), dtype=torch.int64)


def check_answer_tokens(response_ids: torch.Tensor, special_ids: torch.Tensor, tokenizer: Any, turn: int) -> None:
    """Raise :class:`SampleSkipped` when the tokenised answer text contains special tokens: a literal
    ``<|im_end|>`` or ``<|mask|>`` in an answer would be trained as a target (and a vision placeholder
    would break the row)."""
    found = torch.isin(response_ids, special_ids)
    if bool(found.any()):
        names = sorted({tokenizer.convert_ids_to_tokens(int(i)) for i in response_ids[found].unique()})
        raise SampleSkipped(f"assistant turn {turn} contains special token(s) {names} in its text")


def check_prompt_placeholders(text: str, processor: Any, num_images: int, num_videos: int) -> None:
    """Raise :class:`SampleSkipped` unless the rendered chat prompt holds exactly one image / video
    placeholder per image / video of the messages (a user who typed ``<|image_pad|>`` would otherwise
    make the processor fail or feed features to the wrong tokens)."""
    for token, count, name in ((getattr(processor, "image_token", "<|image_pad|>"), num_images, "image"),
                               (getattr(processor, "video_token", "<|video_pad|>"), num_videos, "video")):
        found = text.count(token) if token else 0
        if found != count:
            raise SampleSkipped(f"{name} placeholder/feature mismatch: the prompt text holds {found} {token!r} "
                                f"for {count} {name}(s) in the messages")


def check_media_placeholders(out: Mapping[str, Any], image_token_id: Optional[int], video_token_id: Optional[int],
                             num_images: int, num_videos: int, merge_size: int) -> None:
    """Raise :class:`SampleSkipped` unless the processor output has as many image / video placeholder
    tokens as features and one grid per image / video of the messages (a literal ``<|image_pad|>`` typed
    into a prompt, for example, breaks that)."""
    ids = out["input_ids"]
    merge = merge_size**2
    for token_id, grid_key, name, count in (
        (image_token_id, "image_grid_thw", "image", num_images),
        (video_token_id, "video_grid_thw", "video", num_videos),
    ):
        grid = out.get(grid_key)
        n_tokens = int((ids == token_id).sum()) if token_id is not None else 0
        n_feats = int((grid.prod(-1) // merge).sum()) if grid is not None else 0
        n_grids = int(grid.shape[0]) if grid is not None else 0
        if n_tokens != n_feats or n_grids != count:
            raise SampleSkipped(
                f"{name} placeholder/feature mismatch: {n_tokens} placeholder tokens, {n_feats} features, "
                f"{count} {name}s in the messages"
            )

"""Energon classes of :mod:`nemo_automodel_bard.data.energon` (imported only when Energon is used: this
module needs ``megatron-energon`` at import time; samples cross worker processes, so they live at module level)."""

from __future__ import annotations

from megatron.energon import Cooker, DefaultTaskEncoder, Sample, basic_sample_keys, stateless
from megatron.energon.edataclass import edataclass


@edataclass
class ChatSample(Sample):
    """One cooked shard sample: the chat record (``messages``, ``index``, or ``error``) and its source."""

    record: dict


@stateless
def cook_chat(crude: dict) -> ChatSample:
    """Crude shard sample (``json`` + media parts) -> :class:`ChatSample` (broken samples: error records)."""
    from .energon import chat_record_from_crude

    return ChatSample(**basic_sample_keys(crude), record=chat_record_from_crude(crude))


class ChatTaskEncoder(DefaultTaskEncoder):
    """Cooks crude Bard-VL chat shards; no batching (the recipe's collator batches the records)."""

    cookers = [Cooker(cook_chat)]

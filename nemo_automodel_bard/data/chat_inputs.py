"""Chat messages (text, images, videos) -> processor inputs: the one path every caller takes.

``bard-vl infer``, the server, the lmms-eval plugin (:mod:`nemo_automodel_bard.evaluation.batched`), the pipeline's
evaluation and, for the prompt part of a training row, both collators (:mod:`.collator`, :mod:`.ar_collator`) encode
a chat here, so a chat is the same model input wherever it is trained, served or scored.

A chat is a list of ``{"role": ..., "content": str | [content items]}`` in Qwen-VL's item format
(:mod:`.media`): ``{"type": "text", "text": ...}``, ``{"type": "image" | "image_url", "image": path | PIL | bytes |
{"bytes"|"path"} | data: URI}`` and ``{"type": "video", "video": path | [frames]}``, each media item with its own
size keys (``min_pixels``, ``max_pixels``, ``resized_height``/``resized_width``) and, for a video file, its sampling
keys (``fps``, ``nframes``, ``max_frames``, ...). For each chat:

1. every image is loaded by :func:`.media.load_image_item` (RGB; resized to the item's own size keys, otherwise
   left to the processor's limits) and every video by :func:`.media.load_video_item` (a frame list frame by frame;
   a file decoded and sampled by ``qwen_vl_utils.fetch_video``, keeping its metadata so the prompt's frame
   timestamps are the source's); relative paths resolve against ``image_root``; remote URLs are refused;
2. the chat template renders the prompt text (with the generation prompt) from the messages, each media item
   reduced to its placeholder;
3. the processor turns the texts, images and videos of all chats into one batch, after checking that every prompt
   holds one placeholder per image / video (a typed ``<|image_pad|>`` is refused, not fed the wrong features).

:func:`encode_chats` / :func:`encode_messages` raise :class:`ChatInputError` (a ``ValueError``) naming the chat and
the reason; :func:`prompt_inputs` raises :class:`~.records.SampleSkipped`, which the collators turn into a skipped
sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .media import item_kind, load_image_item, load_video_item, processor_video_kwargs
from .records import ROLES, SampleSkipped, check_media_placeholders, check_prompt_placeholders

__all__ = ["ChatInputError", "RenderedChat", "encode_chats", "encode_messages", "prompt_inputs", "render_chat"]


class ChatInputError(ValueError):
    """A chat cannot be turned into model inputs; the message names the chat (in a batch) and the reason."""


@dataclass
class RenderedChat:
    """One chat ready for the processor: its prompt text and its media, in the order of their placeholders."""

    text: str
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    #: per video: ``qwen_vl_utils`` metadata of a decoded file, ``None`` for a frame list
    video_metadata: list[Optional[dict[str, Any]]] = field(default_factory=list)


def _media_sizes(processor: Any) -> tuple[int, int]:
    """``(patch size, resize factor = patch size x merge size)`` of the processor's image processor."""
    image_processor = getattr(processor, "image_processor", None)
    patch = int(getattr(image_processor, "patch_size", 16) or 16)
    merge = int(getattr(image_processor, "merge_size", 2) or 2)
    return patch, patch * merge


def _template_owner(processor: Any) -> Any:
    return processor if getattr(processor, "chat_template", None) else processor.tokenizer


def render_chat(processor: Any, messages: Sequence[Mapping[str, Any]], image_root: Optional[str] = None) -> RenderedChat:
    """Load the media of one chat and render its prompt text (see the module doc, steps 1 and 2).

    Raises:
        SampleSkipped: a message that is not a ``{"role", "content"}`` dict with a known role, a content that is
            neither a string nor a list, an unknown item type, media that cannot be loaded (naming the file), or
            a prompt text whose image / video placeholders do not match its media.
    """
    patch, factor = _media_sizes(processor)
    rendered: list[dict[str, Any]] = []
    chat = RenderedChat(text="")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or msg.get("role") not in ROLES:
            raise SampleSkipped(f"message {i} is not a {{'role', 'content'}} dict with a known role")
        content = msg.get("content")
        if isinstance(content, str):
            rendered.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise SampleSkipped(f"message {i} content must be a string or a list")
        items = []
        for item in content:
            kind = item_kind(item)
            if kind == "image":
                chat.images.append(load_image_item(item, image_root, factor))
                items.append({"type": "image"})
            elif kind == "video":
                video, metadata = load_video_item(item, image_root, patch, factor)
                chat.videos.append(video)
                chat.video_metadata.append(metadata)
                items.append({"type": "video"})
            else:
                items.append({"type": "text", "text": str(item.get("text") or "")})
        rendered.append({"role": msg["role"], "content": items})
    chat.text = _template_owner(processor).apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    check_prompt_placeholders(chat.text, processor, len(chat.images), len(chat.videos))
    return chat


def _process(processor: Any, chats: Sequence[RenderedChat], padding: bool) -> dict[str, Any]:
    """Step 3 of the module doc for several rendered chats (raises :class:`SampleSkipped`)."""
    images = [image for chat in chats for image in chat.images]
    videos = [video for chat in chats for video in chat.videos]
    if videos and getattr(processor, "video_processor", None) is None:
        raise SampleSkipped("sample has a video but the processor has no video processor")
    video_kwargs = processor_video_kwargs([m for chat in chats for m in chat.video_metadata])
    try:
        out = processor(text=[chat.text for chat in chats], images=images or None, videos=videos or None,
                        padding=padding, return_tensors="pt", **video_kwargs)
    except SampleSkipped:
        raise
    except Exception as exc:  # processor errors: placeholder count mismatches, undecodable videos, ...
        raise SampleSkipped(f"processor failed: {type(exc).__name__}: {exc}") from None
    out = dict(out)
    tokenizer = processor.tokenizer
    image_id = getattr(processor, "image_token_id", None) or tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_id = getattr(processor, "video_token_id", None) or tokenizer.convert_tokens_to_ids("<|video_pad|>")
    merge = int(getattr(getattr(processor, "image_processor", None), "merge_size", 2) or 2)
    check_media_placeholders(out, image_id, video_id, len(images), len(videos), merge)
    if out.get("mm_token_type_ids") is None:  # 1 at image placeholders, 2 at video placeholders
        ids = out["input_ids"]
        mm = (ids == image_id).long() + 2 * (ids == video_id).long()
        out["mm_token_type_ids"] = mm
    return out


def prompt_inputs(processor: Any, messages: Sequence[Mapping[str, Any]],
                  image_root: Optional[str] = None) -> dict[str, Any]:
    """Processor inputs of one chat (batch 1, unpadded): ``input_ids``, ``attention_mask``, ``mm_token_type_ids``
    ``[1, P]`` and the pixel inputs of its media. The collators' prompt part.

    Raises:
        SampleSkipped: naming the reason (unreadable media, placeholder mismatch, processor failure, ...).
    """
    return _process(processor, [render_chat(processor, messages, image_root)], padding=False)


def encode_chats(processor: Any, conversations: Sequence[Sequence[Mapping[str, Any]]], padding: bool = False,
                 image_root: Optional[str] = None) -> dict[str, Any]:
    """Processor inputs for several chats in one batch (see the module doc): what ``infer``, the server, the
    lmms-eval plugin and the pipeline's evaluation decode. ``padding``: pad the prompts to one length on the
    tokenizer's padding side, with their attention mask (several chats of different lengths need it).

    Raises:
        ChatInputError: naming the chat (``chat i`` when there are several) and the reason.
    """
    if not conversations:
        raise ChatInputError("no chat to encode")
    several = len(conversations) > 1
    rendered = []
    for n, messages in enumerate(conversations):
        try:
            rendered.append(render_chat(processor, messages, image_root))
        except SampleSkipped as exc:
            raise ChatInputError(f"chat {n}: {exc.reason}" if several else exc.reason) from None
    try:
        return _process(processor, rendered, padding)
    except SampleSkipped as exc:
        raise ChatInputError(f"chats 0-{len(conversations) - 1}: {exc.reason}" if several else exc.reason) from None


def encode_messages(processor: Any, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Processor inputs (batch 1, unpadded) for one chat (:func:`encode_chats`)."""
    return encode_chats(processor, [messages])

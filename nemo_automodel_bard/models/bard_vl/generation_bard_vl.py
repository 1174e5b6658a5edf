"""Hugging Face ``generate`` conventions on top of Bard-VL's block-wise decoding.

:meth:`BardVLForConditionalGeneration.generate` keeps the published signature
(``generate(batch, max_new_tokens, block_size, denoising_steps, temperature, top_k, top_p,
remasking_strategy, confidence_threshold, return_step_stats)``) and also takes the standard forms that
have a meaning for block diffusion:

* the inputs as keywords (``generate(**batch)``, ``generate(input_ids=..., pixel_values=...)``);
* ``generation_config=`` (a :class:`~transformers.GenerationConfig`, possibly with Bard fields);
* ``do_sample=`` (``False``: greedy; ``True``: sample with ``temperature``/``top_k``/``top_p``);
* ``streamer=`` (a :class:`~transformers.generation.BaseStreamer`): ``put(prompt ids)``, then one
  ``put`` per decoded block (the block's tokens up to the first EOS and ``max_new_tokens``), then ``end()``;
* ``return_dict_in_generate=True``: a :class:`BardVLGenerateOutput` with ``sequences`` and ``step_stats``;
* ``max_length=`` (turned into ``max_new_tokens``), ``use_cache=`` (always on; ignored).

Options that cannot apply (beam search, several sequences per prompt, logits processors, ...) raise a
``ValueError`` naming the option and what is supported.

Which value wins (see docs/decoding.md):

1. an argument of this call;
2. the generation config: the ``generation_config=`` argument, or else the checkpoint's
   ``generation_config.json``. Its Bard fields (``block_size``, ``denoising_steps``,
   ``remasking_strategy``, ``confidence_threshold``, ``mask_token_id``), ``max_new_tokens`` and
   EOS/pad ids always count; its sampling fields (``do_sample``, ``temperature``, ``top_k``, ``top_p``)
   count only if it is a *Bard generation config* (it has at least one Bard field) or the call passes
   ``do_sample=True``. A Qwen-style sampling config (``do_sample: true, temperature: 0.7, top_k: 20,
   top_p: 0.8``, as Qwen3-VL checkpoints ship) therefore does not switch Bard decoding to sampling;
   a warning says so once;
3. ``config.json`` (``block_size``, ``mask_token_id``);
4. the published defaults: ``block_size=4``, ``denoising_steps=block_size``,
   ``remasking_strategy="low_confidence_dynamic"``, ``confidence_threshold=0.9``, greedy,
   ``max_new_tokens=256``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from transformers.utils import ModelOutput

logger = logging.getLogger(__name__)

#: Fields that make a generation config a Bard generation config.
BARD_GENERATION_FIELDS = ("block_size", "denoising_steps", "remasking_strategy", "confidence_threshold", "mask_token_id")
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p")
#: The published ``generate`` arguments, in their positional order after the inputs.
PUBLISHED_POSITIONAL = (
    "max_new_tokens",
    "block_size",
    "denoising_steps",
    "temperature",
    "top_k",
    "top_p",
    "remasking_strategy",
    "confidence_threshold",
    "return_step_stats",
)


def engine_options() -> tuple[str, ...]:
    """Bard options passed straight to the decoding engine: the named parameters of
    :func:`~nemo_automodel_bard.decoding.block_diffusion_generate` (read from its signature)."""
    import inspect

    from nemo_automodel_bard.decoding import block_diffusion_generate

    params = inspect.signature(block_diffusion_generate).parameters.values()
    skip = {"model", "inputs", "generation_config"}
    return tuple(p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in skip)


SUPPORTED = (
    "supported: max_new_tokens (or max_length), block_size, denoising_steps, do_sample, temperature, top_k, top_p, "
    "remasking_strategy, confidence_threshold, eos_token_id, pad_token_id, mask_token_id, streamer, "
    "generation_config, return_dict_in_generate, return_step_stats and the Bard options of "
    "nemo_automodel_bard.decoding.block_diffusion_generate (fused_commit, revise, block_callback, generator, ...)"
)

# option -> (value that means "off", why it cannot apply)
_REFUSED: dict[str, tuple[Any, str]] = {
    "num_beams": (1, "block diffusion decodes one sequence per prompt, there is no beam search"),
    "num_beam_groups": (1, "there is no beam search"),
    "num_return_sequences": (1, "one sequence per prompt; repeat the prompt in the batch to get several samples"),
    "penalty_alpha": (None, "contrastive search needs token-by-token decoding"),
    "diversity_penalty": (0.0, "there is no beam search"),
    "repetition_penalty": (1.0, "tokens of a block are proposed in parallel, so a token-history penalty does not apply"),
    "encoder_repetition_penalty": (1.0, "there is no encoder"),
    "no_repeat_ngram_size": (0, "tokens of a block are proposed in parallel"),
    "bad_words_ids": (None, "no logits processors"),
    "force_words_ids": (None, "no constrained beam search"),
    "constraints": (None, "no constrained beam search"),
    "sequence_bias": (None, "no logits processors"),
    "min_new_tokens": (None, "EOS ends a sample"),
    "min_length": (0, "EOS ends a sample"),
    "typical_p": (1.0, "only temperature, top_k and top_p shape the distribution"),
    "epsilon_cutoff": (0.0, "only temperature, top_k and top_p shape the distribution"),
    "eta_cutoff": (0.0, "only temperature, top_k and top_p shape the distribution"),
    "min_p": (None, "only temperature, top_k and top_p shape the distribution"),
    "suppress_tokens": (None, "no logits processors"),
    "begin_suppress_tokens": (None, "no logits processors"),
    "forced_bos_token_id": (None, "no logits processors"),
    "forced_eos_token_id": (None, "no logits processors"),
    "guidance_scale": (None, "no classifier-free guidance"),
    "watermarking_config": (None, "no logits processors"),
    "assistant_model": (None, "no assisted decoding"),
    "prompt_lookup_num_tokens": (None, "no assisted decoding"),
    "logits_processor": (None, "no logits processors"),
    "stopping_criteria": (None, "decoding stops at EOS or max_new_tokens"),
    "prefix_allowed_tokens_fn": (None, "no constrained decoding"),
    "stop_strings": (None, "decoding stops at EOS or max_new_tokens"),
    "output_scores": (False, "scores are not kept; return_step_stats / record_trajectory give per-block statistics"),
    "output_logits": (False, "logits are not kept; return_step_stats / record_trajectory give per-block statistics"),
    "output_attentions": (False, "attentions are not kept"),
    "output_hidden_states": (False, "hidden states are not kept"),
    "negative_prompt_ids": (None, "no classifier-free guidance"),
    "synced_gpus": (False, "not implemented for block diffusion"),
}
_STRUCTURAL = ("num_beams", "num_beam_groups", "num_return_sequences", "penalty_alpha")
_IGNORED = ("use_cache", "tokenizer")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _is_off(value: Any, off: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, (list, tuple, dict)) and len(value) == 0:
        return True
    return value == off


@dataclass
class BardVLGenerateOutput(ModelOutput):
    """What ``generate(..., return_dict_in_generate=True)`` returns.

    Attributes:
        sequences: the generated ids ``[batch, new_tokens]`` (the response only, as in the tensor form:
            EOS-trimmed, right-padded with the pad id).
        step_stats: the decoding statistics (``block_step_counts``, ``num_response_tokens``,
            ``num_denoising_steps``, ``tpf``, ``forwards_total``, ``tokens_per_forward``, ...).
    """

    sequences: torch.LongTensor | None = None
    step_stats: dict[str, Any] | None = None


def is_bard_generation_config(config: Any) -> bool:
    """Whether a generation config carries Bard decoding fields (and so its sampling settings count)."""
    return config is not None and any(getattr(config, name, None) is not None for name in BARD_GENERATION_FIELDS)


def check_options(options: dict[str, Any], source: str) -> None:
    """Raise for HF options that have no meaning in block diffusion (``source`` says where they came from)."""
    for name, (off, why) in _REFUSED.items():
        if name in options and not _is_off(options[name], off):
            raise ValueError(
                f"Bard-VL generate does not support {name}={options[name]!r} ({source}): {why}. {SUPPORTED}."
            )


def _config_options(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name, None) for name in _REFUSED if hasattr(config, name)}


def effective_generation_config(
    model: Any, generation_config: Any, do_sample: bool | None, explicit: dict[str, Any]
) -> SimpleNamespace:
    """The generation settings handed to the engine, after the rules of the module docstring."""
    given = generation_config is not None
    config = generation_config if given else getattr(model, "generation_config", None)
    source = "generation_config argument" if given else "the checkpoint's generation_config.json"
    if config is not None:
        options = _config_options(config)
        if given:
            check_options({k: v for k, v in options.items() if k in _STRUCTURAL}, source)
        ignored = sorted(k for k, (off, _) in _REFUSED.items() if k in options and not _is_off(options[k], off))
        if ignored:
            _warn_once(f"Bard-VL generate ignores {ignored} from {source} (no meaning in block diffusion)")

    def get(name: str) -> Any:
        return getattr(config, name, None) if config is not None else None

    eff = SimpleNamespace(**{name: get(name) for name in BARD_GENERATION_FIELDS})
    eff.max_new_tokens = get("max_new_tokens")
    eff.eos_token_id = get("eos_token_id")
    eff.pad_token_id = get("pad_token_id")
    eff.temperature, eff.top_k, eff.top_p = get("temperature"), get("top_k"), get("top_p")
    if do_sample is not None:
        eff.do_sample = bool(do_sample)
    elif is_bard_generation_config(config):
        eff.do_sample = bool(get("do_sample"))
    else:
        eff.do_sample = False
        if get("do_sample") and explicit.get("temperature") is None:
            _warn_once(
                f"Bard-VL generate decodes greedily: {source} sets do_sample/temperature/top_k/top_p but has no "
                f"Bard decoding field ({', '.join(BARD_GENERATION_FIELDS)}), so it is taken for an autoregressive "
                "model's sampling defaults. Pass do_sample=True (or temperature=) to sample."
            )
    if eff.do_sample:  # HF's own defaults for unset sampling fields
        eff.temperature = 1.0 if eff.temperature is None else eff.temperature
        eff.top_k = 0 if eff.top_k is None else eff.top_k
        eff.top_p = 1.0 if eff.top_p is None else eff.top_p
    return eff


class _BlockStreamer:
    """Feeds a transformers ``BaseStreamer`` block by block (the tokens the output will hold)."""

    def __init__(self, streamer: Any, opts: Any, chained: Any = None) -> None:
        self.streamer, self.chained = streamer, chained
        self.max_new_tokens, self.block_size = opts.max_new_tokens, opts.block_size
        self.eos = torch.tensor(opts.eos_token_ids)
        self.done: torch.Tensor | None = None

    def __call__(self, k: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        if self.chained is not None:
            self.chained(k, tokens, finished)
        tokens = tokens[:, : max(self.max_new_tokens - k * self.block_size, 0)].cpu()
        if tokens.shape[0] == 1:  # batch 1: stop the stream at EOS, exactly like the returned ids
            is_eos = torch.isin(tokens[0], self.eos)
            if bool(is_eos.any()):
                tokens = tokens[:, : int(is_eos.nonzero()[0]) + 1]
        if tokens.shape[1]:
            self.streamer.put(tokens)


@dataclass
class _Prepared:
    eff: SimpleNamespace
    options: dict[str, Any]
    model_inputs: dict[str, Any]
    streamer: Any
    return_dict: bool


def _input_keys() -> tuple[str, ...]:
    """The processor outputs ``generate`` takes as keywords (the engine's list)."""
    from nemo_automodel_bard.decoding import engine

    return (*engine._MODEL_INPUT_KEYS, *engine._IGNORED_INPUT_KEYS)


def _input_ids(inputs: Any, model_inputs: dict[str, Any]) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    ids = model_inputs.get("input_ids") if inputs is None else inputs["input_ids"]
    if ids is None:
        raise ValueError("generate needs input_ids (pass the processor output)")
    return ids


def _prepare(model: Any, inputs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Prepared:
    if len(args) > len(PUBLISHED_POSITIONAL):
        raise TypeError(f"generate takes at most {len(PUBLISHED_POSITIONAL)} positional options after the inputs")
    kwargs = dict(kwargs)
    for name, value in zip(PUBLISHED_POSITIONAL, args):
        if name in kwargs:
            raise TypeError(f"generate got {name} both positionally and as a keyword")
        kwargs[name] = value

    generation_config = kwargs.pop("generation_config", None)
    do_sample = kwargs.pop("do_sample", None)
    streamer = kwargs.pop("streamer", None)
    return_dict = bool(kwargs.pop("return_dict_in_generate", False))
    max_length = kwargs.pop("max_length", None)
    for name in _IGNORED:
        kwargs.pop(name, None)
    check_options({k: kwargs.pop(k) for k in list(kwargs) if k in _REFUSED}, "argument")

    known = engine_options()
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
    model_inputs = kwargs  # input_ids, attention_mask, pixel_values, ...
    unknown = sorted(k for k in model_inputs if k not in _input_keys())
    if unknown:
        raise TypeError(
            f"generate got unexpected inputs or unknown options {unknown}; options: {', '.join(known)}, do_sample, "
            f"streamer, generation_config, return_dict_in_generate, max_length; model inputs: {', '.join(_input_keys())}"
        )

    if do_sample is False:
        if options.get("temperature") not in (None, 0, 0.0):
            raise ValueError(
                f"do_sample=False (greedy) contradicts temperature={options['temperature']!r}; "
                "drop one of them (temperature > 0 samples)"
            )
        options["temperature"] = 0.0
    eff = effective_generation_config(model, generation_config, do_sample, options)
    if do_sample is True:
        temperature = options.get("temperature")
        temperature = eff.temperature if temperature is None else temperature
        if temperature is None or temperature <= 0:
            raise ValueError(f"do_sample=True needs temperature > 0, got temperature={temperature!r}")

    if max_length is not None:
        if options.get("max_new_tokens") is not None:
            raise ValueError("pass max_new_tokens or max_length, not both (Bard-VL counts new tokens)")
        prompt = int(_input_ids(inputs, model_inputs).shape[-1])
        options["max_new_tokens"] = int(max_length) - prompt
        if options["max_new_tokens"] <= 0:
            raise ValueError(f"max_length={max_length} leaves no room after the prompt of {prompt} tokens")
    return _Prepared(eff, options, model_inputs, streamer, return_dict)


def _resolve(model: Any, prepared: _Prepared) -> Any:
    from nemo_automodel_bard.decoding.engine import resolve_options

    skip = ("block_callback", "record_trajectory", "generator", "return_step_stats")
    return resolve_options(model, prepared.eff, **{k: v for k, v in prepared.options.items() if k not in skip})


def resolve_generate_options(model: Any, *args: Any, **kwargs: Any) -> Any:
    """The :class:`~nemo_automodel_bard.decoding.engine.DecodingOptions` that ``model.generate(inputs, *args,
    **kwargs)`` would decode with (inputs are not needed; ``max_length`` is not resolved)."""
    kwargs.pop("max_length", None)
    return _resolve(model, _prepare(model, None, args, kwargs))


def bard_generate(model: Any, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Implementation of :meth:`BardVLForConditionalGeneration.generate` (see the module docstring)."""
    from nemo_automodel_bard.decoding import block_diffusion_generate

    prepared = _prepare(model, inputs, args, kwargs)
    options, streamer = prepared.options, prepared.streamer
    return_step_stats = bool(options.pop("return_step_stats", False)) or prepared.return_dict
    if streamer is not None:
        opts = _resolve(model, prepared)
        streamer.put(_input_ids(inputs, prepared.model_inputs).cpu())
        options["block_callback"] = _BlockStreamer(streamer, opts, options.get("block_callback"))
    try:
        result = block_diffusion_generate(
            model,
            inputs,
            generation_config=prepared.eff,
            return_step_stats=return_step_stats,
            **options,
            **prepared.model_inputs,
        )
    finally:
        if streamer is not None:
            streamer.end()
    if prepared.return_dict:
        sequences, stats = result
        return BardVLGenerateOutput(sequences=sequences, step_stats=stats)
    return result

def bard_generation_config(config: Any, **overrides: Any) -> Any:
    """A ``GenerationConfig`` holding Bard decoding defaults (block size = the trained one)."""
    from transformers import GenerationConfig

    from nemo_automodel_bard.decoding.defaults import DEFAULT_DECODING, DEFAULT_MAX_NEW_TOKENS

    values = dict(DEFAULT_DECODING)
    values["block_size"] = config.block_size
    values["denoising_steps"] = config.block_size
    values.update(overrides)
    gen = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        do_sample=False,
    )
    for key, value in values.items():
        setattr(gen, key, value)
    gen.mask_token_id = config.mask_token_id
    return gen


__all__ = [
    "BARD_GENERATION_FIELDS",
    "BardVLGenerateOutput",
    "bard_generate",
    "bard_generation_config",
    "check_options",
    "effective_generation_config",
    "is_bard_generation_config",
    "resolve_generate_options",
]

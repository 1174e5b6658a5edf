"""The decoding options a user may set, in one table: name, type, bounds, help.

``bard-vl infer``'s flags, ``bard-vl serve``'s request fields and the lmms-eval plugin's ``model_args`` are
derived from :data:`DECODING_OPTIONS`, and all three parse and check values with :func:`parse_option`, so a
name, a bound or a message is written once. ``None`` always means "the checkpoint's generation config, then
the package defaults" (docs/decoding.md, "Which setting wins"); the engine's own checks
(:class:`~nemo_automodel_bard.decoding.engine.DecodingOptions`) still apply after resolution.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .defaults import DEFAULT_DECODING, DEFAULT_MAX_NEW_TOKENS, DEFAULT_REVISION
from .unmasking import _ALIASES, RULES

#: the largest block a user may ask for (the server may lower it with --max-block-size)
MAX_BLOCK_SIZE = 256


class OptionError(ValueError):
    """A bad decoding option value; ``name`` is the option."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class DecodingOption:
    """One user-settable decoding option.

    Attributes:
        name: the ``generate`` keyword (and lmms-eval model_arg, and request field unless ``field`` says).
        kind: ``int``, ``float``, ``str`` or ``bool``.
        help: one line for ``--help`` and the docs.
        default: what an unset value falls back to, in words.
        low, high: inclusive bounds (``low_open``: ``low`` itself is refused).
        choices: allowed strings.
        field: the OpenAI request field when it differs (``max_tokens`` for ``max_new_tokens``).
        served: whether ``bard-vl serve`` takes it per request (the server's batcher decides ``compile`` itself).
    """

    name: str
    kind: type
    help: str
    default: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    field: str | None = None
    served: bool = True

    @property
    def request_field(self) -> str:
        return self.field or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


DECODING_OPTIONS: tuple[DecodingOption, ...] = (
    DecodingOption("max_new_tokens", int, "most new tokens of an answer", f"generation config, else {DEFAULT_MAX_NEW_TOKENS}",
                   low=1, field="max_tokens"),
    DecodingOption("block_size", int, "tokens decoded in parallel per block (B)",
                   f"generation config, else config.block_size, else {DEFAULT_DECODING['block_size']}",
                   low=1, high=MAX_BLOCK_SIZE),
    DecodingOption("denoising_steps", int, "most denoising forwards per block (at most the block size)",
                   "generation config, else the block size", low=1, high=MAX_BLOCK_SIZE),
    DecodingOption("confidence_threshold", float, "commit every masked position scored above this (dynamic rules)",
                   f"generation config, else {DEFAULT_DECODING['confidence_threshold']}", low=0, high=1),
    DecodingOption("remasking_strategy", str, "the unmasking rule", f"generation config, else {DEFAULT_DECODING['remasking_strategy']}",
                   choices=tuple(RULES) + tuple(sorted(_ALIASES))),
    DecodingOption("temperature", float, "sampling temperature (0 = greedy)", "0 (greedy) unless a Bard generation config samples",
                   low=0, high=2),
    DecodingOption("top_k", int, "sample from the k most likely tokens (0 = off)", "0", low=0),
    DecodingOption("top_p", float, "nucleus sampling mass (1 = off)", "1", low=0, high=1, low_open=True),
    DecodingOption("fused_commit", bool, "write a finished block's K/V in the next block's first forward", "true"),
    DecodingOption("fused_prefill", bool, "run the prompt and block 0's first step as one forward", "true"),
    DecodingOption("eos_exit", bool, "end a block at a committed EOS with everything before it committed", "true"),
    DecodingOption("revise", bool, "let confident new proposals replace committed tokens of the current block", "false"),
    DecodingOption("revision_threshold", float, "probability a revision needs (with revise)",
                   str(DEFAULT_REVISION["revision_threshold"]), low=0, high=1),
    DecodingOption("max_revision_steps", int, "extra forwards per block for revisions (with revise)",
                   str(DEFAULT_REVISION["max_revision_steps"]), low=0, high=16),
    DecodingOption("compile", bool, "static KV cache and compiled block step (same tokens; the first call of a shape "
                   "compiles)", "false", served=False),
)
#: option names, in table order
DECODING_NAMES: tuple[str, ...] = tuple(o.name for o in DECODING_OPTIONS)
_BY_NAME = {o.name: o for o in DECODING_OPTIONS}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def option(name: str) -> DecodingOption:
    """The option called ``name`` (``KeyError`` naming the valid ones otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown decoding option {name!r}; options: {list(DECODING_NAMES)}") from None


def parse_option(name: str, value: Any, *, label: str | None = None, strings: bool = False,
                 high: float | None = None) -> Any:
    """Check (and with ``strings``, convert from text) one value; ``None`` stays ``None``.

    ``label`` names the value in messages (a request field, a flag); ``high`` lowers the table's upper bound.

    Raises:
        OptionError: a ``ValueError`` ``"<label> must be ..."`` naming the bound or the choices.
    """
    if value is None:
        return None
    opt = option(name)
    label = label or name
    kind = opt.kind
    if strings and isinstance(value, str):
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = text.lower() in _TRUE
            elif kind is int:
                value = int(text)
            elif kind is float:
                value = float(text)
        except ValueError:
            raise OptionError(f"{label} must be {_kind_words(kind)}, got {value!r}", name) from None
    if kind is bool:
        if not isinstance(value, bool):
            raise OptionError(f"{label} must be true or false, got {value!r}", name)
        return value
    if kind is str:
        if not isinstance(value, str):
            raise OptionError(f"{label} must be a string, got {value!r}", name)
        if opt.choices is not None and value not in opt.choices:
            raise OptionError(f"unknown {label} {value!r}; valid: {list(opt.choices)}", name)
        return value
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
        raise OptionError(f"{label} must be {_kind_words(kind)}, got {value!r}", name)
    if opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low):
        raise OptionError(f"{label} must be {'>' if opt.low_open else '>='} {_num(opt.low)}, got {value!r}", name)
    bound = opt.high if high is None else (high if opt.high is None else min(high, opt.high))
    if bound is not None and value > bound:
        raise OptionError(f"{label} must be <= {_num(bound)}, got {value!r}", name)
    return kind(value)


def _kind_words(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_options(values: Mapping[str, Any], *, strings: bool = False, labels: Mapping[str, str] | None = None,
                  highs: Mapping[str, float] | None = None) -> dict[str, Any]:
    """:func:`parse_option` for each set value; unknown names raise ``TypeError`` listing the options.
    The result holds only options that were set, and refuses ``denoising_steps`` above ``block_size``."""
    unknown = sorted(set(values) - set(DECODING_NAMES))
    if unknown:
        raise TypeError(f"unknown decoding options {unknown}; options: {list(DECODING_NAMES)}")
    labels, highs = labels or {}, highs or {}
    out = {}
    for name, value in values.items():
        parsed = parse_option(name, value, label=labels.get(name), strings=strings, high=highs.get(name))
        if parsed is not None:
            out[name] = parsed
    check_steps(out.get("block_size"), out.get("denoising_steps"), labels)
    return out


def check_steps(block_size: int | None, denoising_steps: int | None, labels: Mapping[str, str] | None = None) -> None:
    """Refuse more denoising steps than the block has positions (the extra steps could commit nothing)."""
    if block_size is not None and denoising_steps is not None and denoising_steps > block_size:
        labels = labels or {}
        raise OptionError(f"{labels.get('denoising_steps', 'denoising_steps')} must be <= "
                          f"{labels.get('block_size', 'block_size')} ({block_size}), got {denoising_steps}",
                          "denoising_steps")


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] = DECODING_NAMES,
                  title: str = "decoding (default: the checkpoint's generation config)") -> None:
    """One ``--kebab-case`` flag per option (values are checked by :func:`options_from_args`)."""
    group = parser.add_argument_group(title)
    for name in names:
        opt = option(name)
        extra = f"; one of {', '.join(opt.choices)}" if opt.choices else ""
        group.add_argument(opt.flag, dest=name, default=None, metavar=opt.kind.__name__.upper(),
                           help=f"{opt.help} (default: {opt.default}{extra})")


def options_from_args(args: argparse.Namespace, names: Iterable[str] = DECODING_NAMES) -> dict[str, Any]:
    """The set flags of :func:`add_arguments`, parsed and checked (``ValueError`` naming the flag)."""
    values = {n: getattr(args, n, None) for n in names}
    return parse_options(values, strings=True, labels={n: option(n).flag for n in names})


__all__ = ["DECODING_NAMES", "DECODING_OPTIONS", "DecodingOption", "MAX_BLOCK_SIZE", "OptionError", "add_arguments", "check_steps",
           "option", "options_from_args", "parse_option", "parse_options"]

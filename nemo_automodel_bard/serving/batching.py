"""Continuous batching for block-diffusion decoding: scheduling only, the decoding is the engine's.

Requests that decode with the same options (block size, steps, rule, threshold, sampling settings: a
*cohort*) share one batch and one KV cache. This module decides who runs when; every forward, mask and
commit decision comes from :mod:`nemo_automodel_bard.decoding.engine`:

* **joining**: requests that start in the same round with the same options run the engine's fused prefill and
  first block together, as one left-padded ``generate`` batch
  (:meth:`~nemo_automodel_bard.decoding.engine._BlockDecoder.start_block`), then their cache rows are appended to
  their cohort's cache at the cohort's next block boundary, left-padded with keys no query may see;
* **blocks**: a cohort denoises the next block of all its members with one engine
  :class:`~nemo_automodel_bard.decoding.engine.BlockRun` (the fused commit of each member's previous block,
  masks from the engine's visibility-rule mask builder, :func:`~nemo_automodel_bard.decoding.engine.block_inputs`);
* **retiring**: a request whose block held its EOS, that reached its ``max_new_tokens``, that was cancelled or
  ran past its deadline leaves at the end of the block; its cache rows are dropped, and cache columns that no
  remaining request can see are cut;
* **turns**: every running unit (a cohort's block, joining requests' first block) takes **one denoising
  forward per round**, so a cohort with long blocks does not hold back a short request;
* **admission**: a global bound on running requests and on the KV positions they may reach (prompt plus
  ``max_new_tokens`` rounded up to whole blocks), over all cohorts; beyond them requests wait in a bounded queue.

Every per-request decision is taken from that request's own rows, and keys of other requests or padding are
hidden by the attention mask, so with greedy decoding a request's tokens are those ``model.generate`` gives
for it alone (the tests check this, for requests that join a running batch too). With sampling
(``temperature > 0``) the random draws are shared by the cohort, so answers depend on the schedule.

Only dense attention (SDPA / eager) is supported here (the server loads the model with SDPA).
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nemo_automodel_bard.decoding.engine import (
    BlockRun,
    DecodingOptions,
    _BlockDecoder,
    _MaskBuilder,
    _model_inputs,
    block_inputs,
    check_model_inputs,
    commit_block,
)
from nemo_automodel_bard.decoding.unmasking import transfer_schedule

#: ``f(new_token_ids, finished)`` after each committed block of a request (ids cut at EOS / max_new_tokens)
BlockListener = Callable[[list[int], bool], None]


class QueueFull(RuntimeError):
    """The batcher's waiting queue is at its bound; retry later."""


class BatcherStopped(RuntimeError):
    """The batcher was shut down."""


class RequestTooLarge(ValueError):
    """A request that could never run: its prompt and answer exceed the batcher's bound on KV positions."""


class DeadlineExceeded(TimeoutError):
    """A request ran longer than its deadline and was stopped."""


@dataclass
class Request:
    """One prompt to decode: the processor output for a single, unpadded prompt and resolved options.

    ``options`` is a :class:`~nemo_automodel_bard.decoding.engine.DecodingOptions` (its
    ``max_new_tokens`` is this request's own). ``timeout``: seconds from submission after which the request
    is stopped with :class:`DeadlineExceeded` (``None``: the batcher's default). Results are filled in by the
    batcher; ``done`` is set when ``tokens`` / ``stats`` (or ``error``) are final.
    """

    inputs: dict[str, Any]
    options: Any
    on_block: BlockListener | None = None
    on_done: Callable[[], None] | None = None
    timeout: float | None = None
    tokens: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    deadline: float | None = None

    def cancel(self) -> None:
        """Leave at the next block boundary (e.g. the client went away, or a stop string was seen)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> list[int]:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.tokens

    @property
    def positions(self) -> int:
        """KV positions this request may reach: its prompt and ``max_new_tokens`` rounded up to whole blocks."""
        opts = self.options
        blocks = -(-opts.max_new_tokens // opts.block_size)
        return int(self.inputs["input_ids"].shape[-1]) + blocks * opts.block_size


def cohort_key(opts: Any) -> tuple:
    """Options that must be equal for requests to share a batch (everything but ``max_new_tokens`` and how the
    prompt is prefilled, which happens before a request joins)."""
    if not isinstance(opts, DecodingOptions):
        raise TypeError(f"a request's options are resolved DecodingOptions, got {type(opts).__name__}")
    return (
        opts.block_size,
        opts.denoising_steps,
        opts.remasking_strategy,
        float(opts.confidence_threshold),
        float(opts.temperature),
        int(opts.top_k),
        float(opts.top_p),
        opts.mask_token_id,
        tuple(opts.eos_token_ids),
        opts.pad_token_id,
        opts.fused_commit,
        opts.revise,
        opts.eos_exit,
        float(opts.revision_threshold),
        int(opts.max_revision_steps),
    )


@dataclass
class _Member:
    request: Request
    start: int  # first response position
    num_blocks: int
    prefill_forwards: int  # 0 with the fused prefill (block 0's first step), else 1
    commit_forwards: int = 0  # separate commit forwards (fused_commit=False)
    blocks_done: int = 0
    pending: torch.Tensor | None = None  # last block, K/V not yet in the cache
    steps: list[int] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    first_block_at: float | None = None
    started_at: float = 0.0


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers:
        raise TypeError("the batcher needs a transformers DynamicCache with per-layer keys/values")
    return layers


def _record_block(member: _Member, row: list[int], n_steps: int, batch: int, block_size: int) -> bool:
    """Append a finished block to ``member``'s answer and tell its listener; whether the request ends here."""
    request = member.request
    room = request.options.max_new_tokens - member.blocks_done * block_size
    new = row[:room]
    eos = set(request.options.eos_token_ids)
    hit = next((i for i, t in enumerate(new) if t in eos), None)
    if hit is not None:
        new = new[: hit + 1]
    member.blocks_done += 1
    member.steps.append(n_steps)
    member.batch_sizes.append(batch)
    member.first_block_at = member.first_block_at or time.perf_counter()
    request.tokens.extend(new)
    finished = hit is not None or member.blocks_done >= member.num_blocks
    if request.on_block is not None and not request.done.is_set():
        try:
            request.on_block(list(new), finished)
        except Exception:  # noqa: BLE001 - a broken listener (gone client) only ends its own request
            request.cancel()
    return finished or request.cancelled


def _stack_prompts(requests: list[Request], pad_token_id: int, device: torch.device) -> dict[str, Any]:
    """One left-padded batch of several requests' unpadded processor outputs (pixel inputs in row order)."""
    rows = []
    for request in requests:
        data = _model_inputs(request.inputs, {}, device)
        ids = data["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError(f"a request holds one unpadded prompt, got input_ids of shape {tuple(ids.shape)}")
        mask = data.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("a request's prompt must not be padded")
        rows.append(data)
    if len(rows) == 1:
        return rows[0]
    width = max(r["input_ids"].shape[1] for r in rows)

    def left(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([tensor.new_full((1, width - tensor.shape[1]), value), tensor], dim=1)

    out = {"input_ids": torch.cat([left(r["input_ids"], pad_token_id) for r in rows]),
           "attention_mask": torch.cat([left(torch.ones_like(r["input_ids"]), 0) for r in rows])}
    if any(r.get("mm_token_type_ids") is not None for r in rows):
        out["mm_token_type_ids"] = torch.cat([
            left(r["mm_token_type_ids"] if r.get("mm_token_type_ids") is not None else torch.zeros_like(r["input_ids"]), 0)
            for r in rows])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        present = [r[key] for r in rows if r.get(key) is not None]
        if present:
            out[key] = torch.cat(present, dim=0)
    return out


class _Joining:
    """The prefill and first block of requests that start together with the same options, decoded by the engine
    as one ``generate`` batch (left-padded; each row's tokens are those of ``generate`` alone)."""

    def __init__(self, model: Any, requests: list[Request], generator: torch.Generator | None) -> None:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        opts = requests[0].options
        data = _stack_prompts(requests, opts.pad_token_id, device)
        check_model_inputs(model, data)
        self.requests, self.started_at = requests, time.perf_counter()
        self.key = cohort_key(opts)
        longest = max(r.options.max_new_tokens for r in requests)  # capacity only: each row keeps its own bound
        joint = copy.copy(opts)
        joint.max_new_tokens = longest
        self.dec = _BlockDecoder(model, data, joint, device, dtype, generator)
        self.dec.prefill()
        self.run: BlockRun = self.dec.start_block(0, torch.zeros(len(requests), dtype=torch.bool, device=device), None)

    def step(self) -> bool:
        return self.run.step()

    def members(self) -> tuple[list[_Member], list[bool]]:
        """The requests as cohort members after their first block, and which of them already ended."""
        dec = self.dec
        dec.end_block(self.run)
        steps = self.run.steps_per_sample().tolist()
        rows = self.run.block.tolist()
        prefill = dec.forwards["prefill"] - int(dec.opts.fused_prefill)
        members, ended = [], []
        for i, request in enumerate(self.requests):
            member = _Member(request=request, start=int(dec.response_start[i]), prefill_forwards=prefill,
                             num_blocks=-(-request.options.max_new_tokens // dec.B), started_at=self.started_at)
            ended.append(_record_block(member, rows[i], steps[i], len(self.requests), dec.B))
            member.pending = self.run.block[i]
            members.append(member)
        return members, ended

    def rows(self, keep: list[int]) -> tuple[Any, torch.Tensor]:
        """The cache rows ``keep`` (the prompts' K/V) and which of their keys are real, leading padding cut."""
        cache, valid = self.dec.cache, self.dec.valid
        if len(keep) != valid.shape[0]:
            index = torch.tensor(keep, device=valid.device)
            valid = valid.index_select(0, index)
            for layer in _layers(cache):
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        first = int(valid.any(0).nonzero()[0])
        if first:
            valid = valid[:, first:]
            for layer in _layers(cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        return cache, valid


class _Cohort:
    """The running batch of one option set: members, their shared KV cache, which keys are real, the block run."""

    def __init__(self, model: Any, opts: DecodingOptions, generator: torch.Generator | None) -> None:
        self.model, self.opts, self.generator = model, opts, generator
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.B = opts.block_size
        self.schedule = transfer_schedule(self.B, opts.denoising_steps)
        self.eos = torch.tensor(opts.eos_token_ids, device=self.device)
        self.members: list[_Member] = []
        self.cache: Any = None
        self.key_valid: torch.Tensor | None = None  # [batch, cached]
        self.run: BlockRun | None = None

    # ------------------------------------------------------------------------------ joining
    def add(self, members: list[_Member], cache: Any, valid: torch.Tensor) -> None:
        """Append members' cache rows (at a block boundary; ``valid``: which of their keys are real, padding
        on the left), left-padding the shorter side."""
        if self.cache is None:
            self.cache, self.key_valid = cache, valid
        else:
            cached, length = self.key_valid.shape[1], valid.shape[1]
            width = max(cached, length)
            for mine, theirs in zip(_layers(self.cache), _layers(cache)):
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
            self.key_valid = torch.cat([torch.cat([self.key_valid.new_zeros(self.key_valid.shape[0], width - cached),
                                                   self.key_valid], 1),
                                        torch.cat([valid.new_zeros(valid.shape[0], width - length), valid], 1)], dim=0)
        self.members.extend(members)

    # ------------------------------------------------------------------------------ leaving
    def retire(self, keep: list[int]) -> None:
        """Keep only the members at ``keep``; drop their cache rows and the columns nobody can see."""
        if len(keep) == len(self.members):
            return
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.cache = self.key_valid = None
            return
        index = torch.tensor(keep, device=self.device)
        key_valid = self.key_valid.index_select(0, index)
        seen = key_valid.any(0)
        first = int(seen.nonzero()[0]) if bool(seen.any()) else 0  # leading columns no member can see
        self.key_valid = key_valid[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    # ------------------------------------------------------------------------------ one block
    def start_block(self) -> None:
        """The engine's run of every member's next block (each member has its previous block pending)."""
        B, batch, device = self.B, len(self.members), self.device
        noisy = torch.tensor([m.start + m.blocks_done * B for m in self.members], device=device)[:, None]
        noisy = noisy + torch.arange(B, device=device)
        pending = torch.stack([m.pending for m in self.members])
        cached = self.key_valid.shape[1]
        ones = torch.ones(batch, 2 * B, dtype=torch.bool, device=device)
        masks = _MaskBuilder(self.model, torch.cat([self.key_valid, ones], dim=1), self.dtype)
        if self.opts.fused_commit:
            first, steady = block_inputs(masks, cached, noisy, pending, noisy - B)
        else:
            commit_block(self.model, self.cache, masks, cached, pending, noisy - B)
            first, steady = block_inputs(masks, cached + B, noisy)
        self.key_valid = torch.cat([self.key_valid, ones[:, :B]], dim=1)  # the pending block's keys
        block = torch.full((batch, B), self.opts.mask_token_id, dtype=torch.long, device=device)
        self.run = BlockRun(self.model, self.cache, self.opts, first, steady, block, torch.ones_like(block, dtype=torch.bool),
                            schedule=self.schedule, eos=self.eos, generator=self.generator,
                            active=torch.ones(batch, dtype=torch.bool, device=device) if self.opts.revise else None)

    def step(self) -> list[_Member] | None:
        """One forward of the running block; at its end, the members that finished with it (else ``None``)."""
        if not self.run.step():
            return None
        run, self.run = self.run, None
        batch = len(self.members)
        steps = run.steps_per_sample().tolist()
        ended = []
        for member, row, n_steps in zip(self.members, run.block.tolist(), steps):
            member.commit_forwards += 0 if self.opts.fused_commit else 1
            if _record_block(member, row, n_steps, batch, self.B):
                ended.append(member)
        for i, member in enumerate(self.members):
            member.pending = run.block[i]
        return ended


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad ``[batch, heads, seq, dim]`` with zeros to ``seq = width``."""
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([pad, tensor], dim=-2)


def _member_stats(member: _Member, opts: DecodingOptions) -> dict[str, Any]:
    request = member.request
    forwards = member.prefill_forwards + member.commit_forwards + sum(member.steps)  # every forward it took part in
    n = len(request.tokens)
    elapsed = time.perf_counter() - member.started_at
    return {
        "num_response_tokens": n,
        "block_step_counts": list(member.steps),
        "num_blocks": member.blocks_done,
        "forwards": forwards,
        "tokens_per_forward": n / max(forwards, 1),
        "block_size": opts.block_size,
        "denoising_steps": opts.denoising_steps,
        "remasking_strategy": opts.remasking_strategy,
        "confidence_threshold": float(opts.confidence_threshold),
        "mean_batch_size": sum(member.batch_sizes) / max(len(member.batch_sizes), 1),
        "queue_s": member.started_at - request.submitted_at,
        "first_block_s": (member.first_block_at or time.perf_counter()) - request.submitted_at,
        "decode_s": elapsed,
        "tokens_per_second": n / max(elapsed, 1e-9),
        "cancelled": bool(request.cancelled),
    }


class ContinuousBatcher:
    """A worker thread that decodes submitted :class:`Request` s with continuous batching.

    Args:
        model: a Bard-VL model with dense attention, in eval mode.
        max_batch: most requests running at once over **all** cohorts (joining ones included); more wait.
        max_queue: most requests waiting to start; :meth:`submit` raises :class:`QueueFull` beyond it.
        max_positions: most KV positions (:attr:`Request.positions`) of the running requests together; a
            request that alone exceeds it is refused with :class:`RequestTooLarge`. ``None``: no bound.
        timeout: default per-request deadline in seconds (``None``: none).
        seed: seed of the sampling generator (``temperature > 0`` only).
    """

    def __init__(self, model: Any, *, max_batch: int = 16, max_queue: int = 64, max_positions: int | None = None,
                 timeout: float | None = None, seed: int = 0) -> None:
        if getattr(model, "uses_flex_attention", False):
            raise ValueError("the continuous batcher needs dense attention (load the model with SDPA or eager)")
        if max_batch < 1 or max_queue < 0 or (max_positions is not None and max_positions < 1):
            raise ValueError("max_batch and max_positions must be >= 1 and max_queue >= 0")
        self.model, self.max_batch, self.max_queue, self.seed = model, max_batch, max_queue, seed
        self.max_positions, self.timeout = max_positions, timeout
        self.waiting: collections.deque[Request] = collections.deque()
        self.joining: list[_Joining] = []
        self.ready: dict[tuple, list[tuple[list[_Member], Any, torch.Tensor]]] = {}
        self.cohorts: dict[tuple, _Cohort] = {}
        self.lock = threading.Condition()
        self.stopped = False
        self.blocks_run = 0
        self.forwards_run = 0
        self.peak_running = 0
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name="bard-vl-batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------ API
    def has_room(self) -> bool:
        """Whether a request submitted now would be queued (a cheap check before any media decoding)."""
        return not self.stopped and len(self.waiting) < self.max_queue

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (it starts when the global bounds allow). Raises :class:`QueueFull`,
        :class:`RequestTooLarge` or ``ValueError`` for options the batcher cannot decode."""
        cohort_key(request.options)  # refuse unsupported option sets here, not in the worker
        if self.max_positions is not None and request.positions > self.max_positions:
            raise RequestTooLarge(
                f"the request needs {request.positions} KV positions (prompt and max_tokens in whole blocks), more "
                f"than the server's bound of {self.max_positions}")
        with self.lock:
            if self.stopped:
                raise BatcherStopped("the batcher is shut down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue}); retry later")
            request.submitted_at = time.perf_counter()
            timeout = request.timeout if request.timeout is not None else self.timeout
            request.deadline = None if timeout is None else request.submitted_at + timeout
            self.waiting.append(request)
            self.lock.notify()
        return request

    def generate(self, request: Request, timeout: float | None = None) -> list[int]:
        """Submit and wait (for callers on other threads)."""
        return self.submit(request).wait(timeout)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self._running_requests())

    def _running_requests(self) -> list[Request]:
        requests = [r for j in list(self.joining) for r in j.requests]
        requests += [m.request for ready in list(self.ready.values()) for group, _, _ in list(ready) for m in group]
        requests += [m.request for c in list(self.cohorts.values()) for m in list(c.members)]
        return requests

    def shutdown(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()
        self.thread.join(timeout)

    # ------------------------------------------------------------------------------ worker
    def _generator(self) -> torch.Generator:
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(self.seed)

    def _take_waiting(self) -> list[Request]:
        """Pop waiting requests, in arrival order, while the global bounds allow (no overtaking)."""
        taken: list[Request] = []
        with self.lock:
            while not self.stopped and not self.waiting and not self.joining and not self.cohorts and not self.ready:
                self.lock.wait()
            if self.stopped:
                return []
            running = self._running_requests()
            count, positions = len(running), sum(r.positions for r in running)
            while self.waiting:
                request = self.waiting[0]
                if request.cancelled or request.done.is_set():
                    self.waiting.popleft()
                    _fail(request, None, cancelled=True)
                    continue
                if count >= self.max_batch or (self.max_positions is not None
                                               and positions + request.positions > self.max_positions):
                    break
                self.waiting.popleft()
                count, positions = count + 1, positions + request.positions
                taken.append(request)
        return taken

    def _expire(self) -> None:
        """Fail requests past their deadline now (their rows leave at the end of the running block)."""
        now = time.perf_counter()
        for request in self._running_requests() + list(self.waiting):
            if request.deadline is not None and now > request.deadline and not request.done.is_set():
                limit = request.deadline - request.submitted_at
                request.cancel()
                _fail(request, DeadlineExceeded(f"the request ran longer than its deadline of {limit:g} s"))

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                taken = self._take_waiting()
                if self.stopped:
                    break
                groups: dict[tuple, list[Request]] = {}
                for request in taken:  # requests that start together with the same options share a batch
                    groups.setdefault((cohort_key(request.options), request.options.fused_prefill), []).append(request)
                for group in groups.values():
                    try:
                        self.joining.append(_Joining(self.model, group, self._generator()))
                    except Exception as exc:  # noqa: BLE001 - a bad prompt fails only its own request
                        if len(group) == 1:
                            _fail(group[0], exc)
                            continue
                        for request in group:  # find it: each on its own
                            try:
                                self.joining.append(_Joining(self.model, [request], self._generator()))
                            except Exception as single:  # noqa: BLE001
                                _fail(request, single)
                self.peak_running = max(self.peak_running, self.running)
                self._expire()
                self._round()
            # shutting down: nothing more will run
            with self.lock:
                pending = self._running_requests() + list(self.waiting)
                self.waiting.clear()
                self.cohorts.clear()
                self.joining.clear()
                self.ready.clear()
            for request in pending:
                if not request.done.is_set():
                    _fail(request, BatcherStopped("the server is shutting down"))

    def _round(self) -> None:
        """One forward for every joining request and every cohort (cohorts take turns per denoising step)."""
        for joining in list(self.joining):
            self.busy = True
            try:
                done = joining.step()
                self.forwards_run += 1
                if done:
                    self.joining.remove(joining)
                    members, ended = joining.members()
                    for member, end in zip(members, ended):
                        if end:
                            member.request.stats = _member_stats(member, member.request.options)
                            _complete(member.request)
                    keep = [i for i, end in enumerate(ended) if not end]
                    if keep:
                        cache, valid = joining.rows(keep)
                        self.ready.setdefault(joining.key, []).append(([members[i] for i in keep], cache, valid))
            except Exception as exc:  # noqa: BLE001 - fails only these requests
                if joining in self.joining:
                    self.joining.remove(joining)
                for request in joining.requests:
                    _fail(request, exc)
            finally:
                self.busy = False
        for key in list(self.ready):
            if key not in self.cohorts:
                member = self.ready[key][0][0][0]
                self.cohorts[key] = _Cohort(self.model, member.request.options, self._generator())
        for key, cohort in list(self.cohorts.items()):
            self.busy = True
            try:
                if cohort.run is None:  # a block boundary: the ready requests join, then the next block starts
                    for members, cache, valid in self.ready.pop(key, []):
                        cohort.add(members, cache, valid)
                    cohort.start_block()
                ended = cohort.step()
                self.forwards_run += 1
            except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving the others
                for member in cohort.members:
                    _fail(member.request, exc)
                del self.cohorts[key]
                continue
            finally:
                self.busy = False
            if ended is None:
                continue
            self.blocks_run += 1
            if ended:
                gone = {id(m) for m in ended}
                for member in ended:
                    member.request.stats = _member_stats(member, cohort.opts)
                cohort.retire([i for i, m in enumerate(cohort.members) if id(m) not in gone])
            if not cohort.members and not self.ready.get(key):
                del self.cohorts[key]
            # completed only now: a client that sees its request done sees the batcher without it
            for member in ended:
                _complete(member.request)


def _fail(request: Request, exc: BaseException | None, cancelled: bool = False) -> None:
    if request.done.is_set():
        return
    if cancelled:
        request.stats = {"num_response_tokens": len(request.tokens), "cancelled": True}
    else:
        request.error = exc
    _complete(request)


def _complete(request: Request) -> None:
    if request.done.is_set():
        return
    request.done.set()
    if request.on_done is not None:
        try:
            request.on_done()
        except Exception:  # noqa: BLE001 - a listener's failure must not stop the worker
            pass


__all__ = ["BatcherStopped", "BlockListener", "ContinuousBatcher", "DeadlineExceeded", "QueueFull", "Request",
           "RequestTooLarge", "cohort_key"]

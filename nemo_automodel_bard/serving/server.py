"""``bard-vl serve MODEL_DIR``: an OpenAI-compatible HTTP server with continuous batching.

Endpoints: ``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``, ``GET /health``.
Requests are decoded by a :class:`~nemo_automodel_bard.serving.batching.ContinuousBatcher`: concurrent
requests share a batch, a new request joins at the next block boundary and leaves when it ends. A
streamed answer gets one server-sent event per committed block.

Bard decoding options are extra body fields (``block_size``, ``denoising_steps``,
``confidence_threshold``, ``remasking_strategy``, ``top_k``); ``usage`` carries the token counts and,
under ``usage.bard``, the request's step statistics. Needs the ``serve`` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

try:  # FastAPI reads the handlers' annotations by name from this module (the serve extra)
    from starlette.requests import Request as HTTPRequest
except ImportError:  # pragma: no cover - without the extra, main() explains what to install
    HTTPRequest = Any  # type: ignore[misc,assignment]

from nemo_automodel_bard.decoding.schema import DECODING_OPTIONS, MAX_BLOCK_SIZE, OptionError, parse_options

from .batching import BatcherStopped, ContinuousBatcher, DeadlineExceeded, QueueFull, Request, RequestTooLarge
from .media import MediaLimits, RequestError, load_image, resolve_video
from .prompt import TextStream, cut_at_stop, encode_messages

#: OpenAI's own fields that carry decoding options (the schema's request_field)
_OPENAI_DECODING = ("max_tokens", "temperature", "top_p")
#: body fields that select Bard decoding (every option of the decoding schema without an OpenAI name)
SERVED_OPTIONS = tuple(o for o in DECODING_OPTIONS if o.served)
BARD_FIELDS = tuple(o.request_field for o in SERVED_OPTIONS if o.request_field not in _OPENAI_DECODING)
#: OpenAI fields we accept and have no effect here (documented in docs/serving.md)
_IGNORED_FIELDS = ("user", "seed", "metadata", "store", "service_tier", "parallel_tool_calls", "logit_bias")
_KNOWN_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "temperature", "top_p",
    "n", "stop", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "tools", "tool_choice",
    "functions", "function_call", "response_format", *BARD_FIELDS, *_IGNORED_FIELDS,
}


@dataclass
class ServeConfig:
    """Limits and settings of a server (the ``bard-vl serve`` flags)."""

    model_name: str = "bard-vl"
    media_root: Path | None = None
    max_request_bytes: int = 48 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_media_bytes: int = 32 * 1024 * 1024
    max_images: int = 8
    max_videos: int = 1
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 32768
    max_messages: int = 256
    max_stop: int = 4
    max_batch: int = 16
    max_queue: int = 64
    max_positions: int | None = 262144
    max_block_size: int = MAX_BLOCK_SIZE
    request_timeout: float | None = 600.0
    body_timeout: float = 30.0
    disconnect_poll_s: float = 0.25
    seed: int = 0
    limits: MediaLimits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = MediaLimits(
            media_root=Path(self.media_root) if self.media_root else None,
            max_image_pixels=self.max_image_pixels,
            max_media_bytes=self.max_media_bytes,
            max_images=self.max_images,
            max_videos=self.max_videos,
        )


@dataclass
class _Prepared:
    inputs: dict[str, Any]
    options: Any
    stops: list[str]
    stream: bool
    include_usage: bool
    temp_files: list[str]


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            408: "timeout_error", 413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
            504: "timeout_error"}.get(status, "server_error")
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BardServer:
    """The FastAPI application around a loaded model, its processor and a continuous batcher."""

    def __init__(self, model: Any, processor: Any, config: ServeConfig | None = None) -> None:
        self.model, self.processor = model, processor
        self.config = config or ServeConfig()
        self.batcher = ContinuousBatcher(
            model, max_batch=self.config.max_batch, max_queue=self.config.max_queue,
            max_positions=self.config.max_positions, timeout=self.config.request_timeout, seed=self.config.seed,
        )
        self.disconnected = 0  # non-streaming requests whose client went away before the answer
        self.created = int(time.time())
        # fast tokenizers refuse concurrent use ("Already borrowed"): the processor encodes under a lock (in
        # worker threads), and a private copy of the tokenizer decodes (in the event loop thread only)
        self._encode_lock = threading.Lock()
        self._decoder = copy.deepcopy(processor.tokenizer)
        self.app = self._build_app()

    def close(self) -> None:
        self.batcher.shutdown()

    def start_background(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> tuple[str, Any]:
        """Serve in a uvicorn thread of this process (tests, benchmarks): returns ``(base URL, stop)``; ``port=0``
        picks a free port, ``stop()`` ends the server and the batcher."""
        import uvicorn

        uv = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=uv.run, name="bard-vl-http", daemon=True)
        thread.start()
        deadline = time.time() + timeout
        while not uv.started:
            if not thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.05)
        bound = uv.servers[0].sockets[0].getsockname()[1]

        def stop() -> None:
            uv.should_exit = True
            thread.join(30)
            self.close()

        return f"http://{host}:{bound}", stop

    # ------------------------------------------------------------------------------ request -> inputs
    def _media(self, part: dict, kind: str, where: str, temp_files: list[str]) -> dict[str, Any]:
        field_name = f"{kind}_url"
        value = part.get(field_name)
        url = value.get("url") if isinstance(value, dict) else value
        param = f"{where}.{field_name}"
        if kind == "image":
            return {"type": "image", "image": load_image(url, self.config.limits, param=param)}
        path = resolve_video(url, self.config.limits, param=param)
        if isinstance(url, str) and url.startswith("data:"):
            temp_files.append(path)
        return {"type": "video", "video": path}

    def _messages(self, body: dict, temp_files: list[str]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        if len(messages) > self.config.max_messages:
            raise RequestError(f"at most {self.config.max_messages} messages", param="messages")
        out: list[dict[str, Any]] = []
        images = videos = 0
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise RequestError(f"{where} must be an object with role and content", param=where)
            role = message.get("role")
            if role not in ("system", "user", "assistant", "developer"):
                raise RequestError(f"{where}.role must be system, user or assistant, got {role!r}", param=f"{where}.role")
            role = "system" if role == "developer" else role
            content = message.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            if not isinstance(content, list) or not content:
                raise RequestError(f"{where}.content must be a string or a non-empty list of parts", param=f"{where}.content")
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(f"{pwhere}.text must be a string", param=f"{pwhere}.text")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "video_url"):
                    if role != "user":
                        raise RequestError(f"{pwhere}: only user messages may hold images or videos", param=pwhere)
                    media = kind.split("_")[0]
                    if media == "image":
                        images += 1
                        if images > self.config.limits.max_images:
                            raise RequestError(f"at most {self.config.limits.max_images} images per request", param=pwhere)
                    else:
                        videos += 1
                        if videos > self.config.limits.max_videos:
                            raise RequestError(f"at most {self.config.limits.max_videos} videos per request", param=pwhere)
                    parts.append(self._media(part, media, pwhere, temp_files))
                else:
                    raise RequestError(f"{pwhere}.type must be text, image_url or video_url, got {kind!r}", param=pwhere)
            out.append({"role": role, "content": parts})
        if out[-1]["role"] == "assistant":
            raise RequestError("the last message must not be the assistant's (nothing to answer)", param="messages")
        return out

    def _options(self, body: dict) -> Any:
        """The request's decoding options, parsed and bounded by the decoding schema, then resolved."""
        from nemo_automodel_bard.models.bard_vl.generation_bard_vl import resolve_generate_options

        limit = self.config.max_tokens_limit
        values = {o.name: body.get(o.request_field) for o in SERVED_OPTIONS}
        labels = {o.name: o.request_field for o in SERVED_OPTIONS}
        if body.get("max_completion_tokens") is not None:
            values["max_new_tokens"], labels["max_new_tokens"] = body["max_completion_tokens"], "max_completion_tokens"
        try:
            given = parse_options(values, labels=labels,
                                  highs={"max_new_tokens": limit, "block_size": self.config.max_block_size,
                                         "denoising_steps": self.config.max_block_size})
        except OptionError as exc:
            raise RequestError(str(exc), param=labels[exc.name]) from None
        try:
            opts = resolve_generate_options(self.model, **given)
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc)) from None
        if opts.max_new_tokens > limit:
            opts.max_new_tokens = limit  # the checkpoint's default may exceed the server's bound
        if opts.block_size > self.config.max_block_size:
            raise RequestError(f"block_size {opts.block_size} (the checkpoint's default) is larger than this server's "
                               f"bound of {self.config.max_block_size}", param="block_size")
        return opts

    def _check_unsupported(self, body: dict) -> None:
        if body.get("n") not in (None, 1):
            raise RequestError("n must be 1 (one answer per request)", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise RequestError(f"{name} is not supported: the tokens of a block are proposed in parallel", param=name)
        if body.get("logprobs"):
            raise RequestError("logprobs are not supported", param="logprobs")
        for name in ("tools", "functions"):
            if body.get(name):
                raise RequestError(f"{name} are not supported", param=name)
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise RequestError("only response_format {'type': 'text'} is supported", param="response_format")
        unknown = sorted(set(body) - _KNOWN_FIELDS)
        if unknown:
            raise RequestError(
                f"unknown fields {unknown}; Bard decoding options are {list(BARD_FIELDS)}", param=unknown[0]
            )

    def validate(self, body: Any) -> _Prepared:
        """Check everything but the media, cheaply (no image decoding, no processor): fields, options, stops."""
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError("model is required (see GET /v1/models)", param="model")
        if model != self.config.model_name:
            raise RequestError(
                f"model {model!r} is not served here; this server serves {self.config.model_name!r}",
                status=404, param="model",
            )
        self._check_unsupported(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > self.config.max_stop:
            raise RequestError(f"stop must be a non-empty string or a list of at most {self.config.max_stop}", param="stop")
        options = self._options(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        return _Prepared({}, options, stops, stream, bool(stream_options.get("include_usage")), [])

    def build_inputs(self, body: dict, prepared: _Prepared) -> _Prepared:
        """Decode the media and run the processor (in a worker thread, after the queue check)."""
        temp_files = prepared.temp_files
        try:
            messages = self._messages(body, temp_files)
            try:
                with self._encode_lock:
                    inputs = encode_messages(self.processor, messages)
            except RequestError:
                raise
            except Exception as exc:  # noqa: BLE001 - unreadable video, processor refusals: the client's input
                raise RequestError(f"could not process the request's messages: {type(exc).__name__}: {exc}") from None
            n_prompt = int(inputs["input_ids"].shape[1])
            if n_prompt > self.config.max_prompt_tokens:
                raise RequestError(
                    f"the prompt has {n_prompt} tokens, more than the limit of {self.config.max_prompt_tokens}",
                    status=413, param="messages",
                )
            from nemo_automodel_bard.decoding.engine import check_model_inputs

            try:
                check_model_inputs(self.model, inputs)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        except BaseException:
            _remove(temp_files)
            raise
        prepared.inputs = inputs
        return prepared

    def prepare(self, body: Any) -> _Prepared:
        """Validate a chat-completions body and build the model inputs (runs in a worker thread)."""
        prepared = self.validate(body)
        return self.build_inputs(body, prepared)

    # ------------------------------------------------------------------------------ app
    def _build_app(self) -> Any:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.concurrency import run_in_threadpool

        app = FastAPI(title="Bard-VL", version="1")
        server = self

        @app.get("/health")
        async def health() -> Any:
            alive = server.batcher.thread.is_alive()
            body = {"status": "ok" if alive else "down", "model": server.config.model_name,
                    "running": server.batcher.running, "queued": server.batcher.queued}
            return JSONResponse(body, status_code=200 if alive else 503)

        @app.get("/v1/models")
        async def models() -> Any:
            return {"object": "list", "data": [{"id": server.config.model_name, "object": "model",
                                                 "created": server.created, "owned_by": "nemo-automodel-bard"}]}

        @app.post("/v1/chat/completions")
        async def chat(http: HTTPRequest) -> Any:
            try:
                body = await server._read_json(http)
                prepared = server.validate(body)  # cheap checks first
                if not server.batcher.has_room():  # before any image decoding or processor work
                    return _error(429, f"the server is busy: {server.batcher.queued} requests are waiting "
                                       f"(the bound is {server.config.max_queue}); retry later")
                prepared = await run_in_threadpool(server.build_inputs, body, prepared)
            except RequestError as exc:
                return _error(exc.status, str(exc), exc.param)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            request = Request(
                inputs=prepared.inputs,
                options=prepared.options,
                timeout=server.config.request_timeout,
                on_block=lambda ids, finished: loop.call_soon_threadsafe(events.put_nowait, ("block", ids)),
                on_done=lambda: loop.call_soon_threadsafe(events.put_nowait, ("done", None)),
            )
            try:
                server.batcher.submit(request)
            except QueueFull as exc:
                _remove(prepared.temp_files)
                return _error(429, f"the server is busy: {exc}")
            except RequestTooLarge as exc:
                _remove(prepared.temp_files)
                return _error(413, str(exc), "max_tokens")
            except BatcherStopped as exc:
                _remove(prepared.temp_files)
                return _error(503, str(exc))
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            if prepared.stream:
                return StreamingResponse(
                    server._stream(request, prepared, events, completion_id, http),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            try:
                collected = await server._collect(request, prepared, events, http)
            except asyncio.CancelledError:
                request.cancel()
                raise
            finally:
                _remove(prepared.temp_files)
            if collected is None:  # the client went away: it left the batch, nobody reads an answer
                return _error(499, "the client closed the connection")
            text, finish = collected
            if isinstance(request.error, DeadlineExceeded):
                return _error(504, str(request.error))
            if request.error is not None:
                return _error(500, f"decoding failed: {type(request.error).__name__}: {request.error}")
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": server.config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": server._usage(request, prepared),
            }

        return app

    async def _read_json(self, http: Any) -> Any:
        limit = self.config.max_request_bytes
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", status=413)
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in http.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(f"the request body is larger than {limit} bytes", status=413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), timeout=self.config.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.config.body_timeout:g} s",
                               status=408) from None
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from None

    def _usage(self, request: Request, prepared: _Prepared) -> dict[str, Any]:
        prompt = int(prepared.inputs["input_ids"].shape[1])
        completion = len(request.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "bard": dict(request.stats)}

    def _finish_reason(self, request: Request, stopped: bool) -> str:
        eos = set(request.options.eos_token_ids)
        return "stop" if stopped or (request.tokens and request.tokens[-1] in eos) else "length"

    async def _collect(self, request: Request, prepared: _Prepared, events: asyncio.Queue,
                       http: Any = None) -> tuple[str, str] | None:
        """The whole answer of a non-streaming request; ``None`` when its client disconnected first (the
        request is then cancelled: it leaves its batch at the end of the running block)."""
        stops = _StopFilter(prepared.stops)
        stream = TextStream(self._decoder)
        while True:
            try:
                kind, ids = await asyncio.wait_for(events.get(), timeout=self.config.disconnect_poll_s)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    request.cancel()
                    self.disconnected += 1
                    return None
                continue
            if kind == "done":
                break
            if not stops.stopped:
                stops.feed(stream.push(ids))
                if stops.stopped:
                    request.cancel()
        if not stops.stopped:
            stops.feed(stream.push([], final=True))
        stops.flush()
        return stops.text, self._finish_reason(request, stops.stopped)

    async def _stream(self, request: Request, prepared: _Prepared, events: asyncio.Queue, completion_id: str,
                      http: Any) -> AsyncIterator[bytes]:
        created = int(time.time())
        name = self.config.model_name

        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> bytes:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if extra:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n".encode()

        stops = _StopFilter(prepared.stops)
        stream = TextStream(self._decoder)
        block = 0
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, ids = await events.get()
                if kind == "done":
                    break
                text = ""
                if not stops.stopped:
                    text = stops.feed(stream.push(ids))
                    if stops.stopped:
                        request.cancel()
                yield chunk({"content": text}, extra={"bard": {"block": block, "tokens": len(ids)}})
                block += 1
            if request.error is not None:
                message = (str(request.error) if isinstance(request.error, DeadlineExceeded)
                           else f"decoding failed: {type(request.error).__name__}: {request.error}")
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n".encode()
                return
            tail = "" if stops.stopped else stops.feed(stream.push([], final=True))
            tail += stops.flush()
            yield chunk({"content": tail} if tail else {}, finish=self._finish_reason(request, stops.stopped))
            if prepared.include_usage:
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [], "usage": self._usage(request, prepared)}
                yield f"data: {json.dumps(body)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            if not request.done.is_set():
                request.cancel()  # the client went away: leave the batch at the next block boundary
            _remove(prepared.temp_files)


class _StopFilter:
    """Applies stop strings to text arriving in pieces: holds back what could still become a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.full = ""
        self.emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        return self.full[: self.emitted]

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.full += delta
        cut, found = cut_at_stop(self.full, self.stops) if self.stops else (self.full, False)
        if found:
            self.full, self.stopped = cut, True
            out = cut[self.emitted :]
            self.emitted = len(cut)
            return out
        safe = max(len(self.full) - self.hold, self.emitted)
        out = self.full[self.emitted : safe]
        self.emitted = safe
        return out

    def flush(self) -> str:
        out = self.full[self.emitted :]
        self.emitted = len(self.full)
        return out


def _remove(paths: list[str]) -> None:
    import os

    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bard-vl serve", description="OpenAI-compatible server for a Bard-VL checkpoint.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the id clients send as 'model' (default: the directory name)")
    parser.add_argument("--media-root", type=Path, default=None,
                        help="allow image/video file paths below this directory (default: data: URLs only)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="most requests decoding at once, over all option sets; more wait in the queue")
    parser.add_argument("--max-queue", type=int, default=64, help="most requests waiting; more get HTTP 429")
    parser.add_argument("--max-positions", type=int, default=262144,
                        help="most KV positions (prompt + max_tokens in whole blocks) of the running requests together")
    parser.add_argument("--max-block-size", type=int, default=MAX_BLOCK_SIZE, help="largest block_size a request may ask")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take from arrival to its last token (then 504); 0 = none")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body (then 408)")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-tokens", type=int, default=32768)
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    parser.add_argument("--max-request-bytes", type=int, default=48 * 1024 * 1024)
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError:
        print("bard-vl serve needs the serve extra: pip install 'nemo-automodel-bard[serve]'", file=sys.stderr)
        return 2
    from .prompt import load_for_inference

    try:
        model, processor = load_for_inference(args.model_dir, args.device, args.dtype)
    except (FileNotFoundError, ValueError) as exc:
        print(f"bard-vl serve: {exc}", file=sys.stderr)
        return 2
    if args.media_root is not None and not args.media_root.is_dir():
        print(f"bard-vl serve: --media-root {args.media_root} is not a directory", file=sys.stderr)
        return 2
    config = ServeConfig(
        model_name=args.model_name or Path(args.model_dir).resolve().name,
        media_root=args.media_root,
        max_request_bytes=args.max_request_bytes,
        max_image_pixels=args.max_image_pixels,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_positions=args.max_positions,
        max_block_size=args.max_block_size,
        request_timeout=args.request_timeout or None,
        body_timeout=args.body_timeout,
    )
    server = BardServer(model, processor, config)
    import uvicorn

    print(f"serving {config.model_name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        server.close()
    return 0


__all__ = ["BARD_FIELDS", "BardServer", "ServeConfig", "build_parser", "main"]

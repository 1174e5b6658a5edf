"""``bard-vl serve``: the OpenAI-compatible server on localhost, driven by the official ``openai`` client."""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import TOY_PAIRS, toy_picture

openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install .[serve])")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install .[serve])")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install .[serve])")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install .[serve])")

from nemo_automodel_bard.serving.prompt import encode_messages  # noqa: E402
from nemo_automodel_bard.serving.server import BardServer, ServeConfig  # noqa: E402

NAME = "bard-vl-toy"


class _Running:
    """A uvicorn server in a background thread on a free loopback port."""

    def __init__(self, server: BardServer) -> None:
        config = uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    toy_picture(*TOY_PAIRS[0][2]).save(root / "red.png")
    return root


@pytest.fixture(scope="module")
def served(loaded, media_root):
    model, processor = loaded
    server = BardServer(model, processor, ServeConfig(model_name=NAME, media_root=media_root, max_tokens_limit=64,
                                                       max_image_pixels=256 * 256, max_request_bytes=2_000_000))
    running = _Running(server)
    yield server, running
    running.stop()
    server.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(i: int, image_url: str | None = "data") -> list[dict]:
    prompt, _, pic = TOY_PAIRS[i]
    content: list[dict] = []
    if pic is not None and image_url is not None:
        url = _data_url(toy_picture(*pic)) if image_url == "data" else image_url
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def _expected(loaded, i: int, **options) -> tuple[str, dict]:
    """What model.generate answers for pair ``i`` alone (the same processing path, the same fused prefill)."""
    model, processor = loaded
    prompt, _, pic = TOY_PAIRS[i]
    content = [{"type": "image", "image": toy_picture(*pic)}] if pic else []
    content.append({"type": "text", "text": prompt})
    inputs = encode_messages(processor, [{"role": "user", "content": content}])
    ids, stats = model.generate(inputs, return_step_stats=True, **options)
    return processor.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True), stats


def test_models_and_health(client, served):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(served[1].base + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_text_and_image_answers_with_usage(client, loaded):
    for i in (2, 0):
        expected, stats = _expected(loaded, i, max_new_tokens=40, block_size=4, denoising_steps=4)
        reply = client.chat.completions.create(model=NAME, messages=_messages(i), max_tokens=40,
                                               extra_body={"block_size": 4, "denoising_steps": 4})
        assert reply.choices[0].message.content == expected
        assert expected.strip() == TOY_PAIRS[i][1]  # the toy model learnt its answer
        assert reply.choices[0].finish_reason == "stop"
        usage = reply.usage
        assert usage.completion_tokens == stats["num_response_tokens"]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        bard = usage.model_extra["bard"]
        assert bard["block_step_counts"] == stats["block_step_counts"] and bard["block_size"] == 4
        assert bard["forwards"] == stats["forwards_total"]
        assert bard["tokens_per_forward"] == pytest.approx(stats["num_response_tokens"] / stats["forwards_total"])
    # a cut answer says so
    reply = client.chat.completions.create(model=NAME, messages=_messages(2), max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_file_paths_only_below_the_media_root(client, loaded, media_root, tmp_path):
    expected, _ = _expected(loaded, 0, max_new_tokens=40)
    for url in ("red.png", str(media_root / "red.png"), "file://" + str(media_root / "red.png")):
        reply = client.chat.completions.create(model=NAME, messages=_messages(0, image_url=url), max_tokens=40)
        assert reply.choices[0].message.content == expected
    toy_picture(*TOY_PAIRS[0][2]).save(tmp_path / "outside.png")
    for url in (str(tmp_path / "outside.png"), "../" + tmp_path.name + "/outside.png"):
        with pytest.raises(openai.PermissionDeniedError, match="outside the allowed media root"):
            client.chat.completions.create(model=NAME, messages=_messages(0, image_url=url), max_tokens=8)


def test_streaming_sends_one_chunk_per_block(client, loaded):
    expected, stats = _expected(loaded, 1, max_new_tokens=40, block_size=4)
    chunks = list(client.chat.completions.create(model=NAME, messages=_messages(1), max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"block_size": 4}))
    assert chunks[0].choices[0].delta.role == "assistant"
    blocks = [c for c in chunks if c.model_extra.get("bard")]
    assert len(blocks) == stats["num_blocks"] > 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stats["num_response_tokens"]


def test_stop_strings(client, loaded):
    expected, _ = _expected(loaded, 0, max_new_tokens=40)
    cut = expected.index("blue")
    reply = client.chat.completions.create(model=NAME, messages=_messages(0), max_tokens=40, stop=["blue"])
    assert reply.choices[0].message.content == expected[:cut] and reply.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=NAME, messages=_messages(0), max_tokens=40, stop="blue", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[:cut]


def test_concurrent_answers_equal_answers_one_by_one(client):
    jobs = [(i % 3, 8 + 8 * (i % 4), 4 if i % 5 else 8) for i in range(12)]

    def ask(job):
        i, max_tokens, block = job
        reply = client.chat.completions.create(model=NAME, messages=_messages(i), max_tokens=max_tokens,
                                               extra_body={"block_size": block, "denoising_steps": block})
        return reply.choices[0].message.content, reply.usage.completion_tokens, reply.usage.model_extra["bard"]

    one_by_one = [ask(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert [r[:2] for r in together] == [r[:2] for r in one_by_one]
    assert all(r[2]["mean_batch_size"] == 1 for r in one_by_one)
    assert max(r[2]["mean_batch_size"] for r in together) > 1  # they were decoded in shared batches


def _status(base: str, body, *, raw: bytes | None = None) -> tuple[int, str]:
    if raw is not None:
        response = httpx.post(base + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    else:
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    return response.status_code, response.json()["error"]["message"]


def test_malformed_requests_get_clear_4xx(served, client):
    base = served[1].base
    text = [{"role": "user", "content": "How many shapes are there?"}]
    good = {"model": NAME, "messages": text}
    red = _data_url(toy_picture(64, 64, (200, 30, 30)))
    cases = [
        (dict(good, model="gpt-4o"), 404, "is not served here"),
        (dict(good, messages=[]), 400, "non-empty list"),
        (dict(good, messages=[{"role": "robot", "content": "hi"}]), 400, "role must be"),
        (dict(good, max_tokens=0), 400, "max_tokens must be >= 1"),
        (dict(good, max_tokens=10_000), 400, "max_tokens must be <= 64"),
        (dict(good, max_tokens="ten"), 400, "max_tokens must be an integer"),
        (dict(good, block_size=0), 400, "block_size must be >= 1"),
        (dict(good, remasking_strategy="best_first"), 400, "unknown remasking_strategy"),
        (dict(good, top_p=0), 400, "top_p must be > 0"),
        (dict(good, n=2), 400, "n must be 1"),
        (dict(good, frequency_penalty=0.5), 400, "not supported"),
        (dict(good, blocksize=4), 400, "unknown fields ['blocksize']"),
        (dict(good, stream="yes"), 400, "stream must be true or false"),
        (dict(good, messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), 400, "must be text, image_url"),
        (dict(good, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         400, "remote URLs are not fetched"),
        (dict(good, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]),
         400, "not valid base64"),
        (dict(good, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]),
         400, "not a readable image"),
        (dict(good, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(toy_picture(300, 300, (1, 2, 3)))}}]}]),
         413, "more than the limit"),
        (dict(good, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red}}] * 9}]),
         400, "at most 8 images"),
        (dict(good, messages=[{"role": "user", "content": "x" * 3_000_000}]), 413, "larger than 2000000 bytes"),
        ([1, 2], 400, "must be a JSON object"),
    ]
    for body, status, message in cases:
        got, text_ = _status(base, body)
        assert (got, message in text_) == (status, True), (body if len(str(body)) < 300 else status, text_)
    assert _status(base, None, raw=b"{not json")[0] == 400
    with pytest.raises(openai.BadRequestError, match="unknown remasking_strategy"):
        client.chat.completions.create(model=NAME, messages=text, extra_body={"remasking_strategy": "nope"})
    assert httpx.get(base + "/health").json()["status"] == "ok"  # still serving


def test_full_queue_answers_429_before_any_media_work(loaded):
    model, processor = loaded
    server = BardServer(model, processor, ServeConfig(model_name=NAME, max_queue=0))
    running = _Running(server)
    try:
        busy = openai.OpenAI(base_url=running.base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError, match="busy"):
            busy.chat.completions.create(model=NAME, messages=_messages(2), max_tokens=4)
        # an unreadable image still gets the 429: the queue is checked before any image is decoded
        broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                                               {"type": "text", "text": "x"}]}]
        assert _status(running.base, {"model": NAME, "messages": broken})[0] == 429
        # cheap checks still come first: a bad option is a 400 even when the queue is full
        assert _status(running.base, {"model": NAME, "messages": broken, "block_size": 0})[0] == 400
    finally:
        running.stop()
        server.close()


def test_bounds_on_block_size_steps_and_kv_positions(client, served, loaded):
    base = served[1].base
    text = [{"role": "user", "content": "How many shapes are there?"}]
    cases = [
        ({"block_size": 4096}, 400, "block_size must be <= 256, got 4096"),
        ({"block_size": 4, "denoising_steps": 8}, 400, "denoising_steps must be <= block_size (4), got 8"),
        ({"denoising_steps": 4096}, 400, "denoising_steps must be <= 256"),
        ({"revise": "yes"}, 400, "revise must be true or false"),
        ({"max_completion_tokens": 65}, 400, "max_completion_tokens must be <= 64"),
    ]
    for extra, status, message in cases:
        got, text_ = _status(base, {"model": NAME, "messages": text, **extra})
        assert (got, message in text_) == (status, True), (extra, text_)
    model, processor = loaded
    server = BardServer(model, processor, ServeConfig(model_name=NAME, max_positions=64))
    running = _Running(server)
    try:
        got, message = _status(running.base, {"model": NAME, "messages": text, "max_tokens": 60, "block_size": 32})
        assert got == 413 and "more than the server's bound of 64" in message
    finally:
        running.stop()
        server.close()
    # every rule of the engine is a request field, and answers like generate
    expected, stats = _expected(loaded, 1, max_new_tokens=24, block_size=4, revise=True, eos_exit=False)
    reply = client.chat.completions.create(model=NAME, messages=_messages(1), max_tokens=24,
                                           extra_body={"block_size": 4, "revise": True, "eos_exit": False})
    assert reply.choices[0].message.content == expected
    assert reply.usage.model_extra["bard"]["forwards"] == stats["forwards_total"]


def test_media_paths_edge_cases_are_4xx(client, served, loaded, media_root):
    from PIL import Image

    base = served[1].base
    expected, _ = _expected(loaded, 0, max_new_tokens=40)
    for url in ("r%65d.png", "file://" + str(media_root / "r%65d.png"), "file://localhost" + str(media_root / "red.png")):
        reply = client.chat.completions.create(model=NAME, messages=_messages(0, image_url=url), max_tokens=40)
        assert reply.choices[0].message.content == expected, url  # %-encoded paths are decoded
    eps = media_root / "drawing.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with Image.open(eps) as probe:  # what PIL would hand to Ghostscript without the allow-list
        assert probe.format == "EPS"
    cases = [
        ("red\x00.png", 400, "NUL byte"),
        ("red%00.png", 400, "NUL byte"),
        ("a/" * 2500 + "red.png", 400, "more than 1024"),
        ("%2e%2e/%2e%2e/%2e%2e/etc/passwd", 403, "outside the allowed media root"),
        ("file://" + str(media_root) + "/%2e%2e" * 8 + "/etc/hostname", 403, "outside the allowed media root"),
        ("file://%2e%2e/red.png", 400, "must name a local file"),
        ("file://example.com/red.png", 400, "must name a local file"),
        ("%ff%fe.png", 400, "not valid UTF-8"),
        ("drawing.eps", 400, "allowed format"),
        ("missing.png", 400, "no such file"),
    ]
    for url, status, message in cases:
        got, text = _status(base, {"model": NAME, "messages": _messages(0, image_url=url), "max_tokens": 4})
        assert (got, message in text) == (status, True), (url[:40], got, text)
    assert httpx.get(base + "/health").json()["status"] == "ok"


class _Slow:
    """A model whose forwards take at least ``delay`` seconds (everything else is the model's)."""

    def __init__(self, model, delay: float) -> None:
        self._model, self._delay = model, delay

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        time.sleep(self._delay)
        return self._model(*args, **kwargs)


def test_disconnect_deadline_and_body_timeout(loaded):
    import socket

    model, processor = loaded
    server = BardServer(_Slow(model, 0.3), processor,
                        ServeConfig(model_name=NAME, request_timeout=2.0, body_timeout=0.5, max_tokens_limit=64))
    submitted = []
    submit = server.batcher.submit
    server.batcher.submit = lambda request: submitted.append(request) or submit(request)
    running = _Running(server)
    body = {"model": NAME, "messages": _messages(1), "max_tokens": 64, "block_size": 1, "eos_exit": False}
    try:
        # a non-streaming client that goes away: its request stops decoding (leaves at the end of its block)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.base + "/v1/chat/completions", json=body, timeout=0.8)
        assert submitted[0].done.wait(3) and submitted[0].cancelled and server.disconnected == 1
        assert len(submitted[0].tokens) < 10 and submitted[0].stats["cancelled"]
        # a request past its deadline: 504 naming it, soon after the deadline
        started = time.perf_counter()
        got, message = _status(running.base, body)
        assert (got, "deadline of 2 s" in message) == (504, True), message
        assert time.perf_counter() - started < 3.5
        # a body that never arrives: 408 after the body timeout
        with socket.create_connection(("127.0.0.1", int(running.base.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            reply = ""
            while not reply.endswith("}}"):
                piece = sock.recv(4096).decode()
                if not piece:
                    break
                reply += piece
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply
        assert server.batcher.thread.is_alive() and server.batcher.running == 0
    finally:
        running.stop()
        server.close()


def test_video_from_the_media_root_and_inline(client, media_root):
    from nemo_automodel_bard.demo import write_demo_video

    path = write_demo_video(media_root / "clip.mp4")
    inline = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    question = [{"role": "user", "content": [{"type": "text", "text": "What happens?"}]}]
    text_only = client.chat.completions.create(model=NAME, messages=question, max_tokens=4).usage.prompt_tokens
    answers = []
    for url in ("clip.mp4", inline):
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                 {"type": "text", "text": "What happens?"}]}]
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8)
        assert reply.usage.prompt_tokens > text_only + 4  # the frames' tokens are in the prompt
        answers.append(reply.choices[0].message.content)
    assert answers[0] == answers[1]


def test_short_soak_of_mixed_traffic(served, loaded):
    """A short version of benchmarks/serve_soak.py: 15 s at concurrency 16 of valid requests with varied options
    (streaming and not, images inline and from the media root), clients that go away, malformed bodies, oversized
    images and bad options: no 5xx, nothing hung, every valid answer equal to ``generate``'s."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("serve_soak", Path(__file__).resolve().parents[1] / "benchmarks" / "serve_soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    pairs = [(p, toy_picture(*pic) if pic else None) for p, _, pic in TOY_PAIRS]
    answers = {(i, v): _expected(loaded, i, max_new_tokens=soak.MAX_TOKENS, **variant)[0]
               for i in range(len(pairs)) for v, variant in enumerate(soak.VARIANTS)}
    oversized = soak.data_url(toy_picture(300, 300, (1, 2, 3)))
    result = soak.run_soak(served[1].base, NAME, pairs, lambda i, v: answers[i, v], seconds=15, concurrency=16,
                           media_file="red.png", oversized=oversized)
    counts = result["counts"]
    assert not counts.get("5xx") and not counts.get("hung") and not counts.get("mismatch"), result
    assert not result["problems"], result["problems"]
    assert counts["answered"] > 20 and counts.get("bad0:400") and counts.get("bad1:413") and counts.get("bad2:400")
    deadline = time.time() + 30
    while served[0].batcher.running and time.time() < deadline:  # the clients that went away leave their batches
        time.sleep(0.1)
    assert served[0].batcher.running == 0 and served[0].batcher.queued == 0

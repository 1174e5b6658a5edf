"""Using a Bard-VL checkpoint: the ``bard-vl infer`` command, the OpenAI-compatible ``bard-vl serve`` server
and the continuous batcher behind it.

* :mod:`.media` — images and videos of a request (data: URLs, files under an allowed root), with limits;
* :mod:`.prompt` — chat messages -> processor inputs, incremental detokenisation;
* :mod:`.batching` — continuous batching, scheduling only (requests join at a block boundary and leave when
  they end, cohorts take turns per denoising forward, global admission bounds); the decoding is the engine's;
* :mod:`.infer` — ``bard-vl infer``;
* :mod:`.server` — ``bard-vl serve`` (needs the ``serve`` extra: FastAPI and uvicorn).

See ``docs/serving.md``.
"""

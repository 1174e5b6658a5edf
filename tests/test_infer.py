"""``bard-vl infer``: streams committed blocks, prints step statistics, takes images, a video and Bard flags."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import TOY_PAIRS, toy_picture

from nemo_automodel_bard.cli import main as cli_main
from nemo_automodel_bard.serving.infer import main as infer_main
from nemo_automodel_bard.serving.prompt import encode_messages, load_for_inference


class _Recorder(io.StringIO):
    """stdout that remembers each write (one per committed block when streaming)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_streams_blocks_and_prints_stats(toy_model_dir, tmp_path):
    prompt, answer, pic = TOY_PAIRS[0]
    toy_picture(*pic).save(tmp_path / "red.png")
    out, err = _Recorder(), io.StringIO()
    rc = infer_main([str(toy_model_dir), "--image", str(tmp_path / "red.png"), "--prompt", prompt,
                     "--block-size", "4", "--max-new-tokens", "40", "--json"], out=out, err=err)
    assert rc == 0, err.getvalue()
    assert out.getvalue().strip() == answer
    assert len([w for w in out.writes if w.strip()]) >= 3  # block by block, not all at the end
    stats = json.loads(err.getvalue().strip().splitlines()[-1])
    assert stats["block_size"] == 4 and stats["num_blocks"] == len(stats["block_step_counts"]) >= 3
    assert stats["forwards_total"] == sum(stats["block_step_counts"])  # the prefill is block 0's first step

    # the same answer as model.generate on the same inputs; defaults come from the checkpoint
    model, processor = load_for_inference(toy_model_dir, device="cpu")
    inputs = encode_messages(processor, [{"role": "user", "content": [{"type": "image", "image": toy_picture(*pic)},
                                                                       {"type": "text", "text": prompt}]}])
    ids = model.generate(inputs, max_new_tokens=40, block_size=4)
    assert processor.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True).strip() == answer
    out, err = io.StringIO(), io.StringIO()
    assert infer_main([str(toy_model_dir), "--image", str(tmp_path / "red.png"), "--prompt", prompt,
                       "--max-new-tokens", "40"], out=out, err=err) == 0
    assert f"blocks of {model.generation_config.block_size}" in err.getvalue()
    assert "tokens/forward" in err.getvalue()


def test_several_images_a_video_and_chat(tiny_model_dir, tmp_path):
    from nemo_automodel_bard.demo import write_demo_image, write_demo_video

    a, b = write_demo_image(tmp_path / "a.png"), write_demo_image(tmp_path / "b.png", size=64)
    video = write_demo_video(tmp_path / "v.mp4")
    prompts = {}
    for name, extra in (("text", []), ("images", ["--image", str(a), "--image", str(b)]), ("video", ["--video", str(video)])):
        out, err = io.StringIO(), io.StringIO()
        rc = infer_main([str(tiny_model_dir), *extra, "--prompt", "Describe.", "--max-new-tokens", "8", "--json"],
                        out=out, err=err)
        assert rc == 0, err.getvalue()
        prompts[name] = json.loads(err.getvalue().strip().splitlines()[-1])["prompt_tokens"]
    assert prompts["images"] > prompts["text"] + 10 and prompts["video"] > prompts["text"] + 10

    out, err = io.StringIO(), io.StringIO()
    rc = infer_main([str(tiny_model_dir), "--chat", "--max-new-tokens", "4", "--system", "Be brief."],
                    out=out, err=err, stdin=io.StringIO("Hello\nAgain\n\n"))
    assert rc == 0 and err.getvalue().count("tokens/forward") == 2


def test_bad_input_is_refused_clearly(tiny_model_dir, tmp_path, capsys):
    cases = [
        (["--prompt", "x", "--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--prompt", "x", "--block-size", "1024"], "--block-size must be <= 256, got 1024"),
        (["--prompt", "x", "--block-size", "4", "--denoising-steps", "8"], "--denoising-steps must be <= --block-size (4)"),
        (["--prompt", "x", "--top-p", "x"], "--top-p must be a number, got 'x'"),
        (["--prompt", "x", "--revise", "maybe"], "--revise must be true or false"),
        (["--prompt", "x", "--remasking-strategy", "best"], "unknown --remasking-strategy 'best'"),
        (["--prompt", "x", "--image", str(tmp_path / "missing.png")], "no such file"),
        ([], "give --prompt"),
    ]
    for extra, message in cases:
        err = io.StringIO()
        assert infer_main([str(tiny_model_dir), *extra], out=io.StringIO(), err=err) == 2
        assert message in err.getvalue(), err.getvalue()
    assert cli_main(["infer", str(tmp_path), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_one_decoding_options_table_behind_flags_fields_and_model_args():
    """``infer``'s flags, the server's request fields and the lmms-eval model_args are all derived from the decoding
    schema, whose every name is a keyword of the engine."""
    import inspect

    from nemo_automodel_bard.decoding.engine import block_diffusion_generate
    from nemo_automodel_bard.decoding.schema import DECODING_NAMES, DECODING_OPTIONS, parse_options
    from nemo_automodel_bard.evaluation.batched import DECODING_ARGS
    from nemo_automodel_bard.serving import server
    from nemo_automodel_bard.serving.infer import build_parser

    assert set(DECODING_NAMES) <= set(inspect.signature(block_diffusion_generate).parameters)
    actions = {a.dest: a for a in build_parser()._actions}
    for opt in DECODING_OPTIONS:
        assert actions[opt.name].option_strings == [opt.flag] and opt.help in actions[opt.name].help
        assert (opt.request_field in server._KNOWN_FIELDS) == opt.served  # compile is the server's, not a request's
    assert set(server.BARD_FIELDS) | set(server._OPENAI_DECODING) == {o.request_field for o in DECODING_OPTIONS
                                                                       if o.served}
    assert [o.name for o in DECODING_OPTIONS if not o.served] == ["compile"]
    assert DECODING_ARGS == DECODING_NAMES
    # text from a command line or model_args converts; bounds and cross-checks are the same everywhere
    assert parse_options({"block_size": "16", "revise": "true", "top_p": "0.5"}, strings=True) == \
        {"block_size": 16, "revise": True, "top_p": 0.5}
    with pytest.raises(TypeError, match="unknown decoding options \\['blocksize'\\]"):
        parse_options({"blocksize": 4})

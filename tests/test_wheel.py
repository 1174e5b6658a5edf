"""The built wheel is self-contained: installed into a fresh virtual environment (no source checkout on the path)
it answers ``bard-vl --help``, finds its config tree and recipes, and runs the tiny demo."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
         cwd=tmp_path)
    (wheel,) = dist.glob("nemo_automodel_bard-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path)
    # the dependencies (torch, transformers, NeMo, ...) come from this environment's site-packages, appended after
    # the fresh one's (a plain path line: this environment's .pth files, among them our editable install, stay off)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BARD_VL_CONF")}
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = _run([str(python), "-c", "import nemo_automodel_bard, nemo_automodel_bard.pipeline.environment as e; "
                  "print(nemo_automodel_bard.__file__); print(e.config_dir()); print(e.resource_root())"],
                 cwd=work, env=env).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where  # the wheel's copy, not the checkout
    assert (Path(where[2]) / "recipes" / "tiny" / "pbm.yaml").is_file()

    started = time.perf_counter()
    out = _run([str(venv / "bin" / "bard-vl"), "--help"], cwd=work, env=env).stdout
    assert time.perf_counter() - started < 3.0
    assert "pipeline stages" in out and "self_distill" in out and "model     qwen3_vl_2b" in out

    cfg = _run([str(venv / "bin" / "bard-vl"), "--cfg", "job"], cwd=work, env=env, timeout=300).stdout
    assert "recipe_dir: recipes/tiny" in cfg and "block_sizes:" in cfg

    demo = _run([str(venv / "bin" / "bard-vl"), "demo", str(tmp_path / "demo")], cwd=work, env=env, timeout=600)
    assert "[image]" in demo.stdout and "[video]" in demo.stdout  # the model card's code ran on both
    assert (tmp_path / "demo" / "tiny-bard-vl" / "config.json").is_file(), demo.stdout[-2000:]

"""Render a recorded decoding trajectory as a PNG.

``generate(..., return_step_stats=True, record_trajectory=True)`` stores, per block, the step at
which each position was committed (``stats["trajectory"]``). :func:`render_trajectory` draws one
row per block and one cell per position, coloured by that step (early = dark, late = light), with
the token text in the cell when a tokenizer is given — a picture of which tokens the model was sure
about first.

Example:
    >>> ids, stats = model.generate(batch, max_new_tokens=64, block_size=8, return_step_stats=True,
    ...                             record_trajectory=True)                       # doctest: +SKIP
    >>> render_trajectory(stats, "trajectory.png", tokenizer=processor.tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def _blocks(trajectory: Any) -> Sequence[Mapping[str, Any]]:
    if isinstance(trajectory, Mapping):
        if "trajectory" not in trajectory:
            raise ValueError("no trajectory in these stats: decode with record_trajectory=True and return_step_stats=True")
        trajectory = trajectory["trajectory"]
    if not isinstance(trajectory, Sequence) or not trajectory:
        raise ValueError("the trajectory is empty")
    return trajectory


def _token_text(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "\\n").replace("$", r"\$")
    if not text.strip():
        text = repr(text)[1:-1] or "␣"
    return text if len(text) <= 9 else text[:8] + "…"


def render_trajectory(
    trajectory: Any,
    path: str | Path,
    *,
    tokenizer: Any = None,
    sample: int = 0,
    title: str | None = None,
    max_blocks: int | None = None,
) -> Path:
    """Draw which step committed each position, block by block, and save a PNG.

    Args:
        trajectory: ``stats["trajectory"]`` (a list of per-block dicts with ``committed_at``
            ``[batch, B]`` and ``tokens`` ``[batch, B]``) or the whole stats dict.
        path: output file (``.png``).
        tokenizer: decodes each committed token into its cell (otherwise the step number is shown).
        sample: which batch row to draw.
        title: figure title (default: a summary line).
        max_blocks: draw at most this many blocks (the first ones).

    Returns:
        the path written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure
    import numpy as np

    blocks = list(_blocks(trajectory))
    rows = []
    for entry in blocks:
        committed = entry["committed_at"]
        if not 0 <= sample < committed.shape[0]:
            raise ValueError(f"sample={sample} is outside the batch of {committed.shape[0]}")
        active = entry.get("active")
        if active is not None and not bool(active[sample]):
            break  # the sample had stopped before this block
        rows.append((int(entry["block"]), committed[sample].tolist(), entry["tokens"][sample].tolist()))
    if max_blocks is not None:
        rows = rows[:max_blocks]
    if not rows:
        raise ValueError(f"sample {sample} has no decoded block in this trajectory")
    B = len(rows[0][1])
    steps = np.array([r[1] for r in rows], dtype=float)
    steps[steps < 0] = np.nan
    max_step = int(np.nanmax(steps)) if np.isfinite(steps).any() else 0

    width = min(max(4.0, 0.62 * B + 1.8), 26.0)
    height = min(max(2.2, 0.42 * len(rows) + 1.4), 40.0)
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    norm = BoundaryNorm(np.arange(-0.5, max_step + 1.5, 1.0), cmap.N)
    image = ax.imshow(np.ma.masked_invalid(steps), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    font = max(4.5, min(8.0, 70.0 / B))
    for r, (_, committed, tokens) in enumerate(rows):
        for c in range(B):
            if committed[c] < 0:
                continue
            label = _token_text(tokenizer, tokens[c]) if tokenizer is not None else str(committed[c])
            shade = (committed[c] + 0.5) / (max_step + 1)
            ax.text(c, r, label, ha="center", va="center", fontsize=font, color="black" if shade > 0.55 else "white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"block {r[0]}" for r in rows], fontsize=7)
    ax.set_xticks(range(B))
    ax.set_xticklabels([str(c) for c in range(B)], fontsize=6)
    ax.set_xlabel("position in block")
    ax.set_title(title or f"commit step per position (B={B}, sample {sample}, {len(rows)} blocks)", fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, ticks=range(max_step + 1))
    bar.set_label("denoising step", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


__all__ = ["render_trajectory"]

"""PNG figures a person can open (and ``dvc plots show`` embeds): one function per figure kind.

Map of this module:
- ``plot_head_scores``: layer x head heatmap of the head scores S_t (the heads stage).
- ``plot_layer_distribution``: selected neurons per layer, per task and method (the masks stage).
- ``plot_square``: a labelled heatmap of a small table (overlaps, suppression matrices).
- ``plot_deletion_curves``: on- and off-target drop against mask size, with interval bands.
- ``plot_training_curves``: a default model's warm-up and per-task training losses (the report).

Matplotlib is set up once (``_plt``: the non-interactive Agg backend) and every figure is
written by ``_save`` (parent folders created, tight layout, 110 dpi).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _plt():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_head_scores(scores: pd.DataFrame, path: Path, title: str) -> None:
    """Layer x head heatmap of S_t (diverging colour map centred on 0).

    ``scores``: columns layer, head, score, metric (``pipeline.method.heads.score_heads``).
    """
    plt = _plt()
    L, H = int(scores["layer"].max()) + 1, int(scores["head"].max()) + 1
    grid = np.full((L, H), np.nan)
    grid[scores["layer"], scores["head"]] = scores["score"]
    vmax = float(np.nanmax(np.abs(grid))) or 1.0
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * H + 2), max(3, 0.3 * L + 1.5)))
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=f"S = P(base) - P(head substituted) [{scores['metric'].iloc[0]}]")
    _save(fig, path)


def plot_logit_lens(summary: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per task: the mean answer log-probability (nats per token) decoded after each
    layer from the residual stream, the attention output and the FFN output.

    ``summary``: columns task, layer, component, mean_logprob (``logit_lens.lens_summary``).
    """
    plt = _plt()
    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3), sharey=True, squeeze=False)
    styles = {"residual": "-o", "attention": "--s", "ffn": ":^"}
    for ax, task in zip(axes[0], tasks):
        sub = summary[summary["task"] == task]
        for component, style in styles.items():
            part = sub[sub["component"] == component].sort_values("layer")
            ax.plot(part["layer"], part["mean_logprob"], style, label=component)
        ax.set_title(task)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(set(sub["layer"])))
    axes[0][0].set_ylabel("answer log-probability (nats/token)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def plot_layer_distribution(masks: pd.DataFrame, n_layers: int, path: Path, title: str) -> None:
    """Selected neurons per layer: one panel per task, one bar group per method."""
    plt = _plt()
    tasks = list(dict.fromkeys(masks["task"]))
    methods = list(dict.fromkeys(masks["method"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, task in zip(axes[0], tasks):
        sub = masks[masks["task"] == task]
        for k, method in enumerate(methods):
            counts = np.bincount(sub[sub["method"] == method]["layer"], minlength=n_layers)
            ax.bar(np.arange(n_layers) + k * width, counts, width, label=method)
        ax.set_title(task)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("selected neurons")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def plot_square(
    matrix: pd.DataFrame,
    path: Path,
    title: str,
    label: str,
    cmap: str = "viridis",
    center: float | None = None,
    fmt: str = "{:.2f}",
) -> None:
    """A labelled heatmap of a small square (or rectangular) table, values printed in cells."""
    plt = _plt()
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * values.shape[1] + 2, 0.9 * values.shape[0] + 1.5))
    kw = {}
    if center is not None:
        span = float(np.nanmax(np.abs(values - center))) or 1.0
        kw = {"vmin": center - span, "vmax": center + span}
    im = ax.imshow(values, cmap=cmap, **kw)
    ax.set_xticks(range(values.shape[1]), matrix.columns, rotation=30)
    ax.set_yticks(range(values.shape[0]), matrix.index)
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8, color="white" if np.isfinite(v) else "k")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    _save(fig, path)


def plot_deletion_curves(curve: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Two panels (on-target, mean off-target drop in %) against mask size rho (log scale), one
    line per method with its interval as a band. ``curve``: {method: {rho: ``records.CurvePoint``}}
    (``records.UtilitySuppression.curve``, of ``pipeline.outcomes.suppression.suppression_statistics``;
    not imported here: the stages that plot heatmaps alone need no records)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in zip(axes, ("on_target_drop", "off_target_drop"), ("on target", "mean off target")):
        if all(getattr(p, key).value is None for points in curve.values() for p in points.values()):
            # One task studied: nothing is off target.
            ax.text(0.5, 0.5, "no other task", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label)
            continue
        for method, points in curve.items():
            rhos = np.array([float(r) for r in points]) * 100.0
            ivs = [getattr(p, key) for p in points.values()]
            val = np.array([iv.value for iv in ivs], dtype=float)
            lo = np.array([iv.ci_low for iv in ivs], dtype=float)
            hi = np.array([iv.ci_high for iv in ivs], dtype=float)
            (line,) = ax.plot(rhos, val, marker="o", ms=3, label=method)
            ax.fill_between(rhos, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("mask size rho (% of FFN neurons)")
        ax.set_title(label)
    axes[0].set_ylabel("relative drop (%)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def plot_training_curves(summary: dict, path: Path, title: str) -> None:
    """Learning curves of a default model from its ``training.json`` record: the vision warm-up's
    loss (left) and each task's answer cross-entropy (nats, log scale) in the language phase
    (right), both as means over windows of 50 steps."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    warm = summary.get("vision_warmup_loss") or []
    left.plot(np.arange(len(warm)) * 50, warm, color="tab:gray")
    left.set_xlabel("vision warm-up step")
    left.set_ylabel("loss")
    left.set_title("vision tower warm-up")
    for task, values in sorted((summary.get("task_loss_curve") or {}).items()):
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        right.plot(np.arange(len(y)) * 50, y, label=task)
    right.set_yscale("log")
    right.set_xlabel("language step")
    right.set_ylabel("answer cross-entropy (nats)")
    right.set_title("language phase, per task")
    right.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)

"""Pareto plots of a sweep: a PNG (matplotlib) and an interactive HTML page (plotly).

Every trial with a score is drawn: complete trials solid, pruned and unfinished ones faint,
failed ones as crosses; one colour per method; the front (score against adapter parameters) as
a step line, parameters on a log axis. The HTML page shows each trial's config on hover and
carries plotly.js inside it, so it opens offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..space import describe_config
from .pareto import ParetoTrial, SweepTable

__all__ = ["METHOD_COLOURS", "PNG_NAME", "HTML_NAME", "write_png", "write_html", "step_points"]

PNG_NAME = "pareto.png"
HTML_NAME = "pareto.html"
METHOD_COLOURS = {  # CRAFT stands out; the baselines in quieter colours
    "craft": "#d62728",
    "lora": "#1f77b4",
    "pissa": "#2ca02c",
    "vera": "#9467bd",
    "head": "#7f7f7f",
}
_FALLBACK = ["#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_PARAMS_LABEL = "trainable adapter parameters (count, head excluded; log scale)"


def _colour(method: str, methods: list[str]) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    others = [m for m in methods if m not in METHOD_COLOURS]
    return _FALLBACK[others.index(method) % len(_FALLBACK)]


def _x(trial: ParetoTrial) -> float:
    return max(trial.adapter_parameters, 1)  # a head-only trial (0 adapter parameters) sits at 1 on the log axis


def step_points(front: list[ParetoTrial], right: float) -> tuple[list[float], list[float]]:
    """The front as a step line: best score reachable with at most x parameters, up to ``right``."""
    xs = [_x(t) for t in front]
    ys = [t.score for t in front]
    if xs:
        xs.append(max(right, xs[-1]))
        ys.append(ys[-1])
    return xs, ys


def _drawable(table: SweepTable) -> list[ParetoTrial]:
    return [t for t in table.trials if t.score is not None and t.adapter_parameters is not None]


def _title(table: SweepTable, front: list[ParetoTrial]) -> str:
    counts = ", ".join(
        f"{table.count(o)} {o}" for o in ("complete", "pruned", "failed", "unfinished", "running") if table.count(o)
    )
    state = " (running)" if table.running else ""
    return f"sweep {table.name}{state}: {len(table.trials)} trials ({counts}); front of {len(front)}"


def write_png(table: SweepTable, front: list[ParetoTrial], path: str | Path) -> Path:
    """Draw the sweep and its front with matplotlib (Agg) into ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    methods = table.methods
    drawn = _drawable(table)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for method in methods:
        colour = _colour(method, methods)
        mine = [t for t in drawn if t.method == method]
        full = [t for t in mine if t.outcome == "complete"]
        faint = [t for t in mine if t.outcome in ("pruned", "unfinished", "running")]
        failed = [t for t in mine if t.outcome == "failed"]
        ax.scatter([_x(t) for t in full], [t.score for t in full], s=46, color=colour, alpha=0.9,
                   label=f"{method}: full budget ({len(full)})", zorder=3)  # fmt: skip
        if faint:
            ax.scatter([_x(t) for t in faint], [t.score for t in faint], s=30, facecolors="none", edgecolors=colour,
                       alpha=0.35, label=f"{method}: stopped early, last score ({len(faint)})", zorder=2)  # fmt: skip
        if failed:
            ax.scatter([_x(t) for t in failed], [t.score for t in failed], s=30, marker="x", color=colour, alpha=0.5,
                       label=f"{method}: failed ({len(failed)})", zorder=2)  # fmt: skip
    if front:
        right = max(_x(t) for t in drawn) * 1.5
        xs, ys = step_points(front, right)
        ax.step(xs, ys, where="post", color="black", linewidth=1.6, zorder=4, label=f"Pareto front ({len(front)})")
        ax.scatter([_x(t) for t in front], [t.score for t in front], s=110, facecolors="none", edgecolors="black",
                   linewidths=1.4, zorder=5)  # fmt: skip
        for t in front:
            ax.annotate(describe_config(t.config) or t.trial_id, (_x(t), t.score), textcoords="offset points",
                        xytext=(6, -12), fontsize=7, color="0.25")  # fmt: skip
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 20,000 rather than 2x10^4
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(_PARAMS_LABEL)
    ax.set_ylabel(table.score_label)
    ax.set_title(_title(table, front), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _hover(t: ParetoTrial) -> str:
    lines = [
        f"<b>{t.trial_id}</b> ({t.method}, {t.outcome})",
        f"score {t.score:.4f}" + (f" (last evaluation, step {t.step})" if t.outcome != "complete" else ""),
        f"adapter parameters {t.adapter_parameters:,}",
    ]
    if t.train_s is not None:
        lines.append(f"training {t.train_s:.1f} s")
    lines += [f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in sorted(t.config.items())]
    return "<br>".join(lines)


def write_html(table: SweepTable, front: list[ParetoTrial], path: str | Path) -> Path:
    """The same picture as an interactive plotly page (hover: each trial's config), self-contained."""
    import plotly.graph_objects as go

    path = Path(path)
    methods = table.methods
    drawn = _drawable(table)
    fig = go.Figure()
    groups = (("complete", 0.95, "circle", "full budget"), ("pruned", 0.3, "circle-open", "stopped early"),
              ("unfinished", 0.3, "circle-open", "unfinished"), ("running", 0.3, "circle-open", "running"),
              ("failed", 0.5, "x", "failed"))  # fmt: skip
    for method in methods:
        colour = _colour(method, methods)
        for outcome, opacity, symbol, label in groups:
            mine = [t for t in drawn if t.method == method and t.outcome == outcome]
            if not mine:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[_x(t) for t in mine],
                    y=[t.score for t in mine],
                    mode="markers",
                    name=f"{method}: {label} ({len(mine)})",
                    marker={"color": colour, "size": 10 if outcome == "complete" else 8, "symbol": symbol, "opacity": opacity},
                    hovertext=[_hover(t) for t in mine],
                    hoverinfo="text",
                    customdata=[json.dumps({"trial_id": t.trial_id, "config": t.config}, default=str) for t in mine],
                )
            )
    if front:
        xs, ys = step_points(front, max(_x(t) for t in drawn) * 1.5)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"shape": "hv", "color": "black", "width": 2},
                name=f"Pareto front ({len(front)})",
                hoverinfo="skip",
            )  # fmt: skip
        )
        fig.add_trace(
            go.Scatter(
                x=[_x(t) for t in front],
                y=[t.score for t in front],
                mode="markers",
                name="front trials",
                marker={"size": 16, "symbol": "circle-open", "color": "black", "line": {"width": 2}},
                hovertext=[_hover(t) for t in front],
                hoverinfo="text",
            )  # fmt: skip
        )
    fig.update_layout(
        title=_title(table, front),
        xaxis={"title": {"text": _PARAMS_LABEL}, "type": "log"},
        yaxis={"title": {"text": table.score_label}},
        template="plotly_white",
        legend={"font": {"size": 11}},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True)  # plotly.js inside: opens without internet
    return path

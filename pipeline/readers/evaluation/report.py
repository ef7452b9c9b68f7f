"""The evaluation's report: Markdown tables, the reconstruction verdict, a JSON-ready dict and the plot."""

from __future__ import annotations

from pipeline.readers.evaluation.alterations import ALTERATIONS
from pipeline.readers.evaluation.config import ADAPTIVE
from pipeline.readers.evaluation.methods import BASELINES, FULL, TOKEN_DYNAMICS, method_label
from pipeline.readers.evaluation.retrieval import SIMILARITIES
from pipeline.readers.evaluation.run import EvaluationReport, MethodResult


def reconstruction_wins(report: EvaluationReport) -> dict[int | str, bool]:
    """Per budget: does Token Dynamics rebuild the tokens with a lower relative MSE than every baseline?"""
    by_label = {result.label: result for result in report.results}
    wins = {}
    for budget in report.config.budgets:
        ours = by_label[method_label(TOKEN_DYNAMICS, budget)].rel_mse
        wins[budget] = all(ours < by_label[method_label(name, budget)].rel_mse for name in BASELINES)
    return wins


def _format_bytes(count: float) -> str:
    return f"{count / 1024:,.1f} KiB"


def markdown_report(report: EvaluationReport) -> str:
    """The results as Markdown: the main table, recall@1 per alteration, and the reconstruction verdict."""
    t, h, w = report.grid
    config = report.config
    lines = [
        "## Token Dynamics vs baselines at equal token budgets",
        "",
        f"{len(report.clips)} clips x {config.segments} segments = {report.gallery_size} videos of {t} frames x "
        f"{h}x{w} cells ({t * h * w} tokens of {report.dim} dims, {report.encoder}); {report.queries} queries "
        f"({', '.join(ALTERATIONS)}). Fidelity is averaged over the videos, recall over all queries.",
        "",
        "| method | tokens kept | token ratio | bytes / video | rel. MSE (lower is better) | mean cosine | "
        "pooled cosine | R@1 pooled | R@5 pooled | R@1 MaxSim | R@5 MaxSim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.label} | {r.tokens_kept:.1f} | {r.token_ratio:.3f} | {_format_bytes(r.bytes_per_video)} "
            f"({r.byte_ratio:.1%}) | "
            f"{r.rel_mse:.4f} | {r.mean_cosine:.4f} | {r.pooled_cosine:.4f} | {r.recall['pooled'][1]:.3f} | "
            f"{r.recall['pooled'][5]:.3f} | {r.recall['maxsim'][1]:.3f} | {r.recall['maxsim'][5]:.3f} |")
    lines += ["", "Recall@1 per alteration (MaxSim / pooled):", "",
              "| method | " + " | ".join(ALTERATIONS) + " |", "|---|" + "---:|" * len(ALTERATIONS)]
    for r in report.results:
        cells = [f"{r.recall_by_alteration['maxsim'][a]:.2f} / {r.recall_by_alteration['pooled'][a]:.2f}"
                 for a in ALTERATIONS]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    if report.skipped:
        lines += ["", "Skipped (could not be decoded): " + "; ".join(report.skipped) + "."]
    wins = reconstruction_wins(report)
    verdict = ", ".join(f"K={budget}: {'yes' if won else 'no'}" for budget, won in wins.items())
    lines += ["",
              f"Token Dynamics reconstructs better (lower rel. MSE) than both baselines at equal budget: {verdict}.",
              "", "Time: " + ", ".join(f"{phase} {s:.1f} s" for phase, s in report.seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def report_as_dict(report: EvaluationReport) -> dict:
    """JSON-ready form of the report."""
    from dataclasses import asdict

    data = asdict(report)
    data["config"]["ks"] = list(report.config.ks)
    data["reconstruction_wins"] = {str(budget): won for budget, won in reconstruction_wins(report).items()}
    return data


_STYLE = {TOKEN_DYNAMICS: ("tab:red", "o", "Token Dynamics"), "uniform_pool": ("tab:blue", "s", "uniform pooling"),
          "tome_merge": ("tab:green", "^", "ToMe merging")}


def plot_report(report: EvaluationReport, path) -> None:
    """PNG: rel. MSE, mean cosine and recall@1 (MaxSim, pooled) against tokens kept, one line per method over the
    fixed budgets, adaptive budgets as stars, full tokens as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rel_mse", "reconstruction rel. MSE (lower is better)"), ("mean_cosine", "mean cosine"),
              ("maxsim", "recall@1, MaxSim"), ("pooled", "recall@1, pooled cosine")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    full = next(r for r in report.results if r.method == FULL)
    for axis, (key, title) in zip(axes, panels):
        for method, (colour, marker, name) in _STYLE.items():
            fixed = sorted((r for r in report.results if r.method == method and r.budget != ADAPTIVE),
                           key=lambda r: r.tokens_kept)
            axis.plot([r.tokens_kept for r in fixed], [_plotted_value(r, key) for r in fixed],
                      marker=marker, color=colour, label=name)
            for r in report.results:
                if r.method == method and r.budget == ADAPTIVE:
                    axis.plot([r.tokens_kept], [_plotted_value(r, key)], marker="*", markersize=13, color=colour,
                              markeredgecolor="black", linestyle="none")
        if key in SIMILARITIES:  # full tokens reconstruct themselves exactly: a line only where it says something
            axis.axhline(_plotted_value(full, key), color="black", linestyle="--", linewidth=1, label="full tokens")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(report.config.ks) or [1], [str(k) for k in sorted(report.config.ks)] or ["1"])
        axis.minorticks_off()
        axis.set_xlabel("tokens kept per video")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    if all(r.rel_mse > 0 for r in report.results if r.method != FULL):
        axes[0].set_yscale("log")
    axes[-1].plot([], [], marker="*", color="grey", markeredgecolor="black", linestyle="none", markersize=11,
                  label="adaptive K")
    axes[-1].legend(fontsize=8)
    t, h, w = report.grid
    figure.suptitle(f"{report.gallery_size} videos ({len(report.clips)} clips x {report.config.segments} segments), "
                    f"{t * h * w} tokens each, {report.encoder}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plotted_value(result: MethodResult, key: str) -> float:
    if key in SIMILARITIES:
        return result.recall[key][1]
    return getattr(result, key)

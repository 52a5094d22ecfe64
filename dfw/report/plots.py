"""The report's two plots: validation perplexity against the step, and against the state size."""

from __future__ import annotations

import math
from pathlib import Path

from .sources import Run
from .table import reference_ppl

PLOTS = ("val_ppl_vs_step.png", "ppl_vs_state_size.png")


def plot(runs: list[Run], out_dir: Path, baseline: str = "softmax") -> list[Path]:
    """Write both plots into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    done = [r for r in runs if r.status in ("finished", "diverged")]
    paths = [out_dir / name for name in PLOTS]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in done:
        curve = run.val_curve()
        ax.plot(curve.index, curve.values, marker="o", markersize=3, label=run.label)
    ax.set(
        xlabel="optimizer step",
        ylabel="validation perplexity",
        yscale="log",
        title="Validation perplexity (step 0: as converted)",
    )
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference = reference_ppl(runs, baseline)
    if not math.isnan(reference):
        ax.axhline(
            reference,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"{baseline} (KV cache grows with the context)",
        )
    by_name: dict[str, list[Run]] = {}
    for run in done:
        if not math.isnan(run.state_size):
            by_name.setdefault(str(run.config.get("attention.name")), []).append(run)
    for name, group in by_name.items():
        group.sort(key=lambda r: r.state_size)
        (line,) = ax.plot([r.state_size for r in group], [r.val_ppl for r in group], marker="o", label=name)
        if len(group) > 1 or len(by_name) < len(done):
            for r in group:
                if r.label != name:
                    ax.annotate(
                        r.label.removeprefix(name).strip(" ()"),
                        (r.state_size, r.val_ppl),
                        fontsize=6,
                        color=line.get_color(),
                    )
    ax.set_xscale("log", base=2)
    sizes = sorted({r.state_size for group in by_name.values() for r in group})
    if sizes:
        ax.set_xticks(sizes)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%d"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(
        xlabel="state size m (features per head)",
        ylabel="validation perplexity",
        title="Validation perplexity against state size",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths

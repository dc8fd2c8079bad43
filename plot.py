"""plot.py: figures from eval.py results files (JSON lines); reads nothing else.

    python plot.py results/cpu            # reads results/cpu/results.jsonl, writes results/cpu/*.png

Figures (paper numbering): recovery_vs_frac.png (Fig. 1 top), entropy_hist.png (Fig. 1 bottom),
entropy_hist_<preset>.png (Figs. 3-5), entropy_trace.png (Fig. 2 top), entropy_gap.png (Fig. 2 bottom),
entropy_gap_hist_<preset>.png (Figs. 6-8), sample_score.png (Fig. 11, with the test NELBO), and hopfield.png
(Section 3, from `eval.py hopfield`).
"""
import json
import os
import sys
from collections import defaultdict

import numpy as np


def load(path):
    path = os.path.join(path, "results.jsonl") if os.path.isdir(path) else path
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    return by_kind


def presets_of(records):
    """Presets in the order the sweep ran them."""
    return list(dict.fromkeys(r["preset"] for r in records))


def frac_axis(ax, records):
    """Log-scale fraction axis at the bottom, the matching number of training rows at the top."""
    n_all = max(r["n_train_rows"] / r["frac"] for r in records)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training split (log scale)")
    top = ax.secondary_xaxis("top", functions=(lambda f: f * n_all, lambda n: n / n_all))
    top.set_xlabel("training rows", fontsize=8)


def plot_recovery(R, plt):
    rec = R["recovery"]
    presets = presets_of(rec)
    ts = sorted({r["t"] for r in rec})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(ts)))
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4.2), squeeze=False, sharey=True)
    for ax, preset in zip(axes[0], presets):
        for t, color in zip(ts, colors):
            for split, style in (("train", "-"), ("test", "--")):
                pts = sorted((r["frac"], r["recovery"]) for r in rec
                             if r["preset"] == preset and r["t"] == t and r["split"] == split)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, label=f"t={t:g} {split}")
        frac_axis(ax, rec)
        ax.set_title(f"{preset}: corrupt-token recovery, Eq. (11)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recovery rate of perturbed tokens")
    axes[0][-1].legend(fontsize=7, ncol=2)
    return fig


def hist_panel(ax, edges, series, title):
    centers = (np.array(edges[1:]) + np.array(edges[:-1])) / 2
    width = edges[1] - edges[0]
    for (label, counts), color in zip(series, ("tab:blue", "tab:red", "tab:green")):
        counts = np.asarray(counts, float)
        if counts.sum():
            ax.bar(centers, counts / counts.sum() / width, width=width, alpha=0.5, color=color,
                   label=f"{label} (n={int(counts.sum())})")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("conditional entropy, Eq. (12) (nats)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)


def hist_grid(plt, chosen, series, subtitle, suptitle):
    """One histogram panel per record of chosen, four to a row."""
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), chosen):
        hist_panel(ax, r["edges"], series(r), subtitle(r))
    for ax in axes.ravel()[len(chosen):]:
        ax.axis("off")
    fig.suptitle(suptitle)
    return fig


def plot_entropy_hist(R, plt, preset=None, t=0.25):
    """Recovered vs unrecovered tokens at t: one panel per preset at its largest fraction (preset=None), or
    one panel per fraction of one preset."""
    hists = [r for r in R["entropy_hist"] if r["t"] == t and r["split"] == "train"]
    if preset is None:
        chosen = [max((r for r in hists if r["preset"] == p), key=lambda r: r["frac"]) for p in presets_of(hists)]
    else:
        chosen = sorted((r for r in hists if r["preset"] == preset), key=lambda r: r["frac"])
    return hist_grid(plt, chosen, lambda r: [("recovered", r["recovered"]), ("unrecovered", r["unrecovered"])],
                     lambda r: f"{r['preset']}, frac {r['frac']:g} ({r['n_train_rows']} rows), t = {t:g}",
                     "entropy of recovered vs unrecovered training tokens")


def plot_entropy_trace(R, plt):
    traces = R["entropy_trace"]
    presets = presets_of(traces)
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4.2), squeeze=False, sharey=True)
    for ax, preset in zip(axes[0], presets):
        mine = sorted((r for r in traces if r["preset"] == preset), key=lambda r: r["frac"])
        colors = plt.cm.plasma(np.linspace(0, 0.9, len(mine)))
        for r, color in zip(mine, colors):
            ax.plot(r["t"], r["entropy"], color=color, label=f"frac {r['frac']:g}")
        ax.set_xlim(1, 0)
        ax.set_xlabel("t (reverse process runs from 1 to 1e-5)")
        ax.set_title(f"{preset}: mean entropy along the reverse process")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean conditional entropy (nats/token)")
    return fig


def plot_entropy_gap(R, plt):
    gaps = R["entropy_gap"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for preset, color in zip(presets_of(gaps), ("tab:blue", "tab:orange", "tab:green")):
        pts = sorted((r["frac"], r["entropy_train"], r["entropy_generated"]) for r in gaps
                     if r["preset"] == preset)
        n, train, gen = zip(*pts)
        ax.plot(n, train, "-o", ms=3, color=color, label=f"{preset}: training rows")
        ax.plot(n, gen, "--s", ms=3, color=color, label=f"{preset}: generated samples")
    frac_axis(ax, gaps)
    ax.set_ylabel("mean conditional entropy at t = 1e-5 (nats)")
    ax.set_title("entropy gap: generated vs training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_gap_hist(R, plt, preset):
    mine = sorted((r for r in R["entropy_gap_hist"] if r["preset"] == preset), key=lambda r: r["frac"])
    return hist_grid(plt, mine, lambda r: [("training", r["train"]), ("generated", r["generated"])],
                     lambda r: f"{preset}, frac {r['frac']:g} ({r['n_train_rows']} rows), t = 1e-5",
                     "entropy of training vs generated tokens")


def plot_score(R, plt):
    scores, nelbo = R["sample_score"], R["nelbo"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for preset, color in zip(presets_of(scores), ("tab:blue", "tab:orange", "tab:green")):
        pts = sorted((r["frac"], r["ppl"], r["ppl_test_rows"]) for r in scores if r["preset"] == preset)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=color, label=f"{preset} samples")
        ax1.axhline(pts[-1][2], color="gray", ls=":", lw=1)
        pts = sorted((r["frac"], r["val_nelbo"]) for r in nelbo if r["preset"] == preset)
        ax2.plot(*zip(*pts), "-o", ms=3, color=color, label=preset)
    ax1.set_yscale("log")
    ax1.set_ylabel("perplexity under the reference scorer")
    ax1.set_title(f"generated samples; scorer: {scores[0]['scorer']}\n(dotted: the same scorer on real test rows)",
                  fontsize=9)
    ax2.set_ylabel("test NELBO (nats/token)")
    ax2.set_title("test NELBO, Eq. (3)")
    for ax in (ax1, ax2):
        frac_axis(ax, scores)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_hopfield(R, plt):
    """Section 3: capacity of Hebbian vs pseudo-likelihood couplings, and the toy memorization -> generalization."""
    cap, gen = R["hopfield_capacity"], R["hopfield_generalization"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule, color in (("hebbian", "tab:blue"), ("pseudo-likelihood", "tab:red")):
        pts = sorted((r["gamma"], r["fixed_points"], r["retrieved"]) for r in cap if r["rule"] == rule)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=3, color=color, label=f"{rule}: fixed points")
        ax1.plot([p[0] for p in pts], [p[2] for p in pts], "--s", ms=3, color=color,
                 label=f"{rule}: retrieved from 10% flips")
    ax1.axvline(0.138, color="gray", ls=":", lw=1)
    ax1.axvline(2.0, color="gray", ls=":", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("load gamma = P / L (dotted: 0.138 Hebbian, 2 Gardner)")
    ax1.set_ylabel("fraction of random patterns")
    ax1.set_title(f"capacity, L = {cap[0]['L']}", fontsize=10)
    for split, style in (("train", "-o"), ("test", "--s")):
        pts = sorted((r["P"], r["recovery"], r["prototype_overlap"]) for r in gen if r["split"] == split)
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, color="tab:red",
                 label=f"{split}: flipped spins restored")
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, ms=3, color="tab:gray", alpha=0.6,
                 label=f"{split}: overlap with nearest prototype")
    pts = sorted((r["P"], r["converged"]) for r in gen if r["split"] == "test")
    ax2.plot(*zip(*pts), ":", color="black", lw=1, label="test: dynamics reached a fixed point")
    ax2.set_xscale("log")
    ax2.set_xlabel("training patterns P")
    ax2.set_title(f"pseudo-likelihood on {gen[0]['prototypes']} noisy prototypes (noise {gen[0]['noise']:g}), "
                  f"L = {gen[0]['L']}", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python plot.py RESULTS_DIR_OR_FILE", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    R = load(argv[0])
    out_dir = argv[0] if os.path.isdir(argv[0]) else os.path.dirname(argv[0])
    figures = {"recovery_vs_frac": (plot_recovery, "recovery"), "entropy_hist": (plot_entropy_hist, "entropy_hist"),
               "entropy_trace": (plot_entropy_trace, "entropy_trace"), "entropy_gap": (plot_entropy_gap, "entropy_gap"),
               "sample_score": (plot_score, "sample_score"), "hopfield": (plot_hopfield, "hopfield_capacity")}
    for preset in presets_of(R["entropy_hist"]):
        figures[f"entropy_hist_{preset}"] = (lambda R, plt, p=preset: plot_entropy_hist(R, plt, p), "entropy_hist")
    for preset in presets_of(R["entropy_gap_hist"]):
        figures[f"entropy_gap_hist_{preset}"] = (lambda R, plt, p=preset: plot_gap_hist(R, plt, p), "entropy_gap_hist")
    written = []
    for name, (fn, kind) in figures.items():
        if R[kind]:
            fig = fn(R, plt)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{name}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PNG figures (matplotlib, an optional extra: ``pip install moecompress[plot]``)."""

from __future__ import annotations

from pathlib import Path

import torch

from moecompress.algorithms.expert_scores import js_divergence
from moecompress.errors import MoecompressError
from moecompress.formats.profile import Profile
from moecompress.io.outdir import atomic_file

__all__ = ["plot_profile"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoecompressError("plotting needs matplotlib", "pip install 'moecompress[plot]' (or matplotlib)") from None
    return plt


def plot_profile(profile: Profile, out_dir: Path) -> list[Path]:
    """Write ``expert_usage.png`` (layer x expert routing share per task) and ``task_divergence.png``
    (per-layer Jensen-Shannon divergence between every pair of tasks, and the task x task mean)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, layers = profile.tasks, profile.model["moe_layers"]
    shares = {t: (profile.stats[t]["count"] / profile.stats[t]["count"].sum(-1, keepdim=True)).float() for t in tasks}
    vmax = max(float(s.max()) for s in shares.values())
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.2 + 2.6 * len(tasks), 0.5 + 0.45 * len(layers) + 1.2),
                             squeeze=False, constrained_layout=True)
    for ax, t in zip(axes[0], tasks):
        im = ax.imshow(shares[t].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{t}\n({profile.tokens[t]:,} tokens)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of top-k picks")
    fig.suptitle(f"Expert usage per task ({profile.model['architecture']}, {profile.model['num_experts']} experts, "
                 f"top-{profile.model['top_k']})", fontsize=10)
    usage = out_dir / "expert_usage.png"
    with atomic_file(usage) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

    n = len(tasks)
    mean = torch.zeros(n, n)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for a in range(n):
        for b in range(n):
            if a != b:
                jsd = js_divergence(shares[tasks[a]], shares[tasks[b]]).float()
                mean[a, b] = jsd.mean()
                if a < b:
                    ax1.plot(layers, jsd.numpy(), marker="o", label=f"{tasks[a]} vs {tasks[b]}")
    ax1.set_xticks(layers)
    ax1.set_xlabel("MoE layer")
    ax1.set_ylabel("JS divergence (bits)")
    ax1.set_title("How differently tasks route, per layer")
    ax1.legend(fontsize=7, ncol=2)
    im = ax2.imshow(mean.numpy(), cmap="magma", vmin=0)
    ax2.set_xticks(range(n), tasks, rotation=45, ha="right")
    ax2.set_yticks(range(n), tasks)
    for a in range(n):
        for b in range(n):
            ax2.text(b, a, f"{float(mean[a, b]):.2f}", ha="center", va="center", fontsize=8,
                     color="white" if mean[a, b] < mean.max() * 0.6 else "black")
    ax2.set_title("Mean JS divergence over layers (bits)")
    fig.colorbar(im, ax=ax2)
    divergence = out_dir / "task_divergence.png"
    with atomic_file(divergence) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return [usage, divergence]

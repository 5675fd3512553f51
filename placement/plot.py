"""PNG figures of plans and routing statistics (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesaic.placement.metrics import cross_gpu_share, gpu_loads
from moesaic.placement.plan import Placement
from moesaic.placement.stats import RoutingStats


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_affinity(stats: RoutingStats, layer: int, path: Path) -> Path:
    plt = _plt()
    A = stats.affinity()[layer]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(A, cmap="viridis", vmin=0)
    ax.set_xlabel(f"expert j at layer {layer + 1}")
    ax.set_ylabel(f"expert i at layer {layer}")
    ax.set_title(f"affinity P(j at {layer + 1} | i at {layer})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loads(plans: dict[str, Placement], stats: RoutingStats, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(len(plans), 1, figsize=(8, 2.4 * len(plans)), squeeze=False)
    for ax, (name, plan) in zip(axes[:, 0], plans.items()):
        loads = gpu_loads(plan, stats)
        rel = loads / loads.mean(1, keepdims=True)
        im = ax.imshow(rel.T, aspect="auto", cmap="magma", vmin=0.5, vmax=max(1.5, float(rel.max())))
        ax.set_ylabel("GPU")
        ax.set_title(f"{name}: load / layer mean (worst {rel.max():.3f})")
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_plan_map(plan: Placement, path: Path, max_layers: int = 64) -> Path:
    plt = _plt()
    L, G = min(plan.num_layers, max_layers), plan.num_gpus
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * L), max(3, 0.4 * G)))
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_ylim(G - 0.5, -0.5)
    small = plan.num_experts() <= 16
    for l in range(L):
        for g in range(G):
            experts = plan.experts_on(l, g)
            ax.add_patch(plt.Rectangle((l - 0.5, g - 0.5), 1, 1, fill=True, alpha=0.15 + 0.1 * (g % 2), lw=0.2, ec="k"))
            if small:
                ax.text(l, g, ",".join(map(str, experts)), ha="center", va="center", fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("GPU")
    ax.set_title(f"plan map ({plan.meta.get('method', '?')}): expert ids per GPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cross_share(plans: dict[str, Placement], stats: RoutingStats, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, plan in plans.items():
        overall, per_layer = cross_gpu_share(plan, stats, per_layer=True)
        ax.plot(np.arange(len(per_layer)), per_layer, marker=".", label=f"{name} ({overall:.3f})")
    ax.set_xlabel("layer transition l -> l+1")
    ax.set_ylabel("cross-GPU flow share")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: list[dict], path: Path) -> Path:
    """rows: {"label", "load_max", "cross_gpu_share"}; one point each."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.scatter(r["load_max"], r["cross_gpu_share"])
        ax.annotate(r["label"], (r["load_max"], r["cross_gpu_share"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("worst-layer load (max / mean)")
    ax.set_ylabel("cross-GPU flow share")
    ax.set_title("cross-GPU share against load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(plans: dict[str, Placement], stats: RoutingStats, out_dir: Path, layer: int = 0) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_affinity(stats, min(layer, max(stats.num_layers - 2, 0)), out_dir / "affinity.png"),
             plot_loads(plans, stats, out_dir / "loads.png"),
             plot_cross_share(plans, stats, out_dir / "cross_gpu_share.png")]
    for name, plan in plans.items():
        paths.append(plot_plan_map(plan, out_dir / f"plan_map_{name}.png"))
    return paths

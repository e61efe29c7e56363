"""Pictures of a run: sample grids, reward curves, the paper's Figure 1 (Tweedie estimates along two trajectories
with their rewards r_k) and Figure 2 (mean |gain| per denoising step, |g_k| = |r_{k+1} - r_k|, METHOD.md §3-4).

Every function takes plain tensors or the metrics history (a list of dicts, one per iteration) and writes a PNG.
"""
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt


def _image(ax, img, title):
    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).float().numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def grid(images, captions, path, cols=8):
    """images (B, 3, H, W) in [0, 1] with one caption each."""
    n = len(images)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _image(ax, images[i], textwrap.fill(captions[i], 20))
        else:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves(history, path):
    """Training reward (mean over the iteration's trajectories) and held-out reward against iteration."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(h["it"], h["reward"]) for h in history if "reward" in h]
    held = [(h["it"], h["eval_reward"]) for h in history if "eval_reward" in h]
    ax.plot(*zip(*train), alpha=0.6, label="train reward")
    ax.plot(*zip(*held), "o-", label="held-out reward (ODE)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gains(history, path):
    """Figure 2: mean |g_k| per denoising step, over the first and the last third of the run (stepwise runs only)."""
    rows = [h["gain_abs"] for h in history if "gain_abs" in h]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    third = max(1, len(rows) // 3)
    for name, part in (("first third", rows[:third]), ("last third", rows[-third:])):
        mean = [sum(col) / len(col) for col in zip(*part)]
        ax.bar([k + (0.2 if name == "last third" else -0.2) for k in range(len(mean))], mean, width=0.4, label=name)
    ax.set_xlabel("denoising step k (state k -> k+1; 0 = from pure noise)")
    ax.set_ylabel("mean |gain|  |r_{k+1} - r_k|")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trajectories(images, rewards, levels, prompt, path):
    """Figure 1: images (2, T+1, 3, H, W) of x0_est along two trajectories from one noise, titled with t and r_k."""
    n, K = images.shape[:2]
    fig, axes = plt.subplots(n, K, figsize=(1.3 * K, 1.5 * n + 0.4), squeeze=False)
    for i in range(n):
        for k in range(K):
            _image(axes[i, k], images[i, k], f"t={float(levels[k]):.2f}\nr={float(rewards[i, k]):.2f}")
    fig.suptitle(f'"{prompt}": Tweedie estimates and their rewards along two trajectories', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

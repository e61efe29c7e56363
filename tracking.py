"""Experiment tracking (--log-to): every logged key and the sample grids, to TensorBoard or Weights & Biases.

    --log-to tensorboard   event files in out/tensorboard: `tensorboard --logdir runs`
    --log-to wandb         a W&B run named after --out (WANDB_MODE=offline writes it locally, `wandb sync` later)
Neither package is a requirement of the project: it is imported only when asked for, and a missing one is a
one-line error saying what to install. metrics.jsonl is written either way. A list-valued key (gain_abs) goes in
as one scalar a step, gain_abs/k; the figures as images.
"""
import importlib.util
import os

from files import UserError

TRACKERS = ("none", "tensorboard", "wandb")


def check(kind):
    """A UserError before any work when --log-to names a package that is not installed."""
    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise UserError(f"--log-to {kind}: the {kind} package is not installed (it is not a requirement of this "
                        f"project); `pip install {kind}`, or drop --log-to")


def scalars(metrics):
    """{key: float} of an iteration's metrics: numbers as they are, each entry k of a list as key/k."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, list):
            out |= {f"{key}/{k}": float(v) for k, v in enumerate(value)}
    return out


class TensorBoard:
    def __init__(self, out, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, metrics, step):
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, name, path, step):
        import matplotlib.image

        self.writer.add_image(name, matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out, config):
        import wandb

        self.wandb = wandb
        self.run = self.wandb.init(project="stepgrpo", name=os.path.basename(os.path.normpath(out)), dir=out,
                                   config=config)

    def log(self, metrics, step):
        self.run.log(scalars(metrics), step=step)

    def image(self, name, path, step):
        self.run.log({name: self.wandb.Image(path)}, step=step)

    def close(self):
        self.run.finish()


def open_tracker(kind, out, config):
    """The tracker --log-to names, writing next to out/ (None for "none")."""
    return {"tensorboard": TensorBoard, "wandb": WandB}[kind](out, config) if kind != "none" else None

"""A training run around its iterations: built from the flags, resumed, logged, checkpointed, evaluated, drawn.

train.main calls these, one line each; the method itself is in stepgrpo.py and sde.py (METHOD.md §2-5).
    start           check the flags, build the world, reward, policy and LoRA, prepare --out, resume if asked
    build_world     the model behind the loop: the toy world or a diffusers SD3 pipeline (world.World)
    held_out        the held-out reward of the weights in use (the EMA's, if any), and a sample grid
    log, save       a line of out/metrics.jsonl, the tracker (--log-to) and the progress bar; a checkpoint and
                    the LoRA to use
    finish          the final evaluation and the figures; then the summary line
Under torchrun only rank 0 (`Run.lead`) writes and prints (parallel.py, choice 17).
"""
import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

import config
import evaluate
import files
import parallel
import plots
import rewards
import sde
import tracking
from lora import LoRA
from world import World


@dataclass
class Run:
    """What every iteration works with, built once by `start`."""
    cfg: config.Config  # its guidance and reward resolved
    world: World  # the model behind the loop
    reward_fn: Callable  # R(images (B, 3, H, W) in [0, 1], prompts) -> (B,)
    policy: sde.Policy  # the sampler, its schedule and guidance, the steps trained
    lora: LoRA  # the trained weights, their optimizer and EMA
    ranks: int  # processes under torchrun (1 without)
    lead: bool  # rank 0, the one that writes and prints
    tracker: object = None  # TensorBoard or W&B (--log-to, tracking.py), rank 0's


def build_world(cfg, device):
    """The model behind the loop (world.World): the built-in toy world or a diffusers SD3 pipeline."""
    if cfg.model == "toy":
        import toy

        # the toy reward reads only prompts of its grammar
        steps = cfg.pretrain_steps or toy.DEFAULT_PRETRAIN_STEPS
        return toy.ToyWorld(device, cfg.cache_dir, steps, prompts=prompt_sets(cfg, check=toy.parse))
    import sd3

    return sd3.SD3World.load(cfg.model, device, resolution=cfg.resolution, text_encoders=cfg.text_encoders,
                             gradient_checkpointing=cfg.gradient_checkpointing, prompts=prompt_sets(cfg))


def prompt_sets(cfg, check=None):
    """(training, held-out) prompts of --prompts and --eval-prompts, None where the world's own serve. A dataset
    folder given to --prompts also gives the held-out set, its test split, unless --eval-prompts names one."""
    train = files.read_prompts(cfg.prompts, check) if cfg.prompts else None
    held_out = None
    if cfg.eval_prompts:
        held_out = files.read_prompts(cfg.eval_prompts, check, split="test", flag="--eval-prompts")
    elif cfg.prompts and os.path.isdir(cfg.prompts):
        held_out = files.read_prompts(cfg.prompts, check, split="test")
    return train, held_out


def start(cfg):
    """Check the flags, build the world, the reward, the policy and the LoRA, and prepare --out, resuming from its
    checkpoint if asked. Returns the Run, the first iteration and the history so far."""
    config.check(cfg)
    rank, ranks, device = parallel.setup()
    if cfg.prompts_per_step % ranks:
        raise config.UsageError(f"--prompts-per-step={cfg.prompts_per_step} does not divide over the {ranks} ranks: "
                                f"each rank samples whole prompt groups; give a multiple of {ranks}")
    torch.manual_seed(cfg.seed)  # the LoRA's gaussian init, the same on every rank
    world = build_world(cfg, device)
    if cfg.prompts_per_step > len(world.train_prompts):
        raise config.UsageError(f"--prompts-per-step={cfg.prompts_per_step} is invalid: the training prompts "
                                f"number only {len(world.train_prompts)}")
    default_reward = "toy_geneval" if cfg.model == "toy" else "pickscore"
    cfg = replace(cfg, guidance=cfg.guidance or world.default_guidance, reward=cfg.reward or default_reward)
    try:
        rewards.check_prompts(cfg.reward, world.train_prompts + world.eval_prompts)
    except ValueError as e:  # before any model is loaded for it
        raise files.LoadError(f"--reward {cfg.reward}: {e}; give --prompts whose prompts it can score") from None
    reward_fn = rewards.build(cfg.reward, device, cfg.reward_batch)
    policy = config.policy(cfg, cfg.guidance)
    run = Run(cfg, world, reward_fn, policy, LoRA(world.transformer, cfg), ranks, lead=rank == 0)
    if run.lead:
        files.output_folder(cfg.out)
        run.tracker = tracking.open_tracker(cfg.log_to, cfg.out, asdict(cfg))
    first, history = 0, []
    if cfg.resume and parallel.all_true(files.has_checkpoint(cfg.out)):
        first, history = files.load_checkpoint(cfg.out, run.lora, ranks)
    elif cfg.resume and run.lead:  # a requeued job that died before its first checkpoint: as Lightning does
        print(f"train.py: --resume: no checkpoint in {cfg.out} yet: starting from scratch", file=sys.stderr)
    if run.lead:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        describe(run, device)
    write_metrics(run, history, mode="w")  # a resumed run rewrites the log up to its checkpoint
    return run, first, history


def describe(run, device):
    """Print the resolved config and the counts it implies."""
    cfg = run.cfg
    G, N, U = cfg.prompts_per_step, cfg.group_size, cfg.updates_per_iteration
    B = G * N
    print(json.dumps(asdict(cfg)))
    print(f"device {device} x {run.ranks} rank(s) | guidance {cfg.guidance} | {B} trajectories/iter ({G} prompts x "
          f"{N}, {B // run.ranks} a rank) | steps trained {run.policy.trained} -> {B * len(run.policy.trained)} "
          f"transitions/iter | {U} optimizer steps/iter, each over {B // U} trajectories in micro-batches of <= "
          f"{cfg.micro_batch}; {U * cfg.steps} in all")


def write_metrics(run, rows, mode="a"):
    """Rows of metrics, one JSON line each, into out/metrics.jsonl (rank 0)."""
    if run.lead:
        with open(os.path.join(run.cfg.out, "metrics.jsonl"), mode) as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def record(run, m):
    """One row of metrics, at iteration m["it"], into out/metrics.jsonl and the tracker (rank 0)."""
    write_metrics(run, [m])
    if run.tracker:
        run.tracker.log(m, step=m["it"])


def log(run, bar, m):
    """An iteration's metrics into out/metrics.jsonl, the tracker and the progress bar."""
    record(run, m)
    shown = {"eval": f"{m['eval_reward']:.3f}"} if "eval_reward" in m else {}
    bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2g}", **shown)


def save(run, it, history):
    """A checkpoint after iteration it - 1 (rank 0): out/ckpt.pt to resume from, out/lora to use (files.py)."""
    if run.lead:
        files.save_checkpoint(run.cfg.out, run.lora, dict(it=it, history=history, world_size=run.ranks))


@contextmanager
def interruptible():
    """A list that a first Ctrl-C fills (the run then stops after its iteration); a second Ctrl-C aborts."""
    stop = []
    previous = signal.signal(signal.SIGINT, lambda *a: stop.append(1) if not stop else previous(*a))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def held_out(run, it, samples=None):
    """The held-out metrics of the LoRA in use (the EMA's, if any) at iteration `it`; `samples`: a PNG of the first
    16 to write (and to track)."""
    with run.lora.averaged():
        m, images, prompts = evaluate.held_out(run.world, run.reward_fn, run.cfg)
    if samples and run.lead:
        plots.grid(images[:16], prompts[:16], os.path.join(run.cfg.out, samples))
        track_image(run, samples, it)
    return m


def track_image(run, name, it):
    """The PNG out/`name`, if written, to the tracker."""
    path = os.path.join(run.cfg.out, name)
    if run.tracker and os.path.isfile(path):
        run.tracker.image(name.removesuffix(".png"), path, it)


def finish(run, history):
    """The final held-out evaluation, logged as iteration `steps`, and the run's figures."""
    cfg = run.cfg
    history.append({"it": cfg.steps} | held_out(run, cfg.steps, "samples_end.png"))
    record(run, history[-1])
    if run.lead:
        with run.lora.averaged():
            images, r, prompt = evaluate.figure1(run.world, run.reward_fn, run.policy, cfg)
        plots.curves(history, os.path.join(cfg.out, "reward_curve.png"))
        plots.gains(history, os.path.join(cfg.out, "fig2_gains.png"))
        plots.trajectories(images, r, run.policy.levels, prompt, os.path.join(cfg.out, "fig1_trajectories.png"))
        for name in ("reward_curve.png", "fig2_gains.png", "fig1_trajectories.png"):
            track_image(run, name, cfg.steps)


def summary(run, history):
    """Print the held-out reward before and after; return the history, the held-out rewards and the output folder."""
    evals = [h for h in history if "eval_reward" in h]
    if run.lead:
        text = f"held-out adherence {evals[0]['eval_reward']:.3f} -> {evals[-1]['eval_reward']:.3f}"
        if "eval_quality" in evals[0]:
            text += f", render quality {evals[0]['eval_quality']:.3f} -> {evals[-1]['eval_quality']:.3f}"
        print(f"{text}; outputs in {run.cfg.out}/")
    if run.tracker:
        run.tracker.close()
    return dict(history=history, eval_rewards=[h["eval_reward"] for h in evals], out=run.cfg.out)

"""The run's configuration: one Config dataclass, its presets, its flags and its checks (train.py runs it).

Every field is a flag (--group-size 8); `python train.py --help` shows each one's comment below, its valid values
and its default. Presets fill in what a world or a method needs, and flags given on the command line override them:
    toy()               the built-in toy world on a CPU
    sd35()              the paper's setup: SD3.5 Medium, PickScore, one GPU, Flow-GRPO's settings
    flow_grpo_method()  --advantage flow_grpo runs the baseline as Flow-GRPO runs it (choice 6): the whole
                        batch's reward std and an initial noise of its own for every trajectory
A mistake in a flag is a UsageError naming the flag and its valid values; train.py prints it as one line.
"""
import argparse
import dataclasses
import inspect
import os
import re
from dataclasses import dataclass

import rewards
import sde
import stepgrpo
import tracking
from files import UserError


@dataclass
class Config:
    model: str = "toy"  # "toy", or a diffusers SD3 pipeline: a hub id or a local folder
    reward: str = ""  # a reward or a weighted sum, ocr:0.8,pickscore:0.2 ("" = toy_geneval on the toy, else pickscore)
    reward_batch: int = 0  # images a reward scores at once (0 = all); Stepwise scores T+1 images a trajectory
    prompts: str = ""  # training prompts: a FILE, one a line, or a Flow-GRPO dataset FOLDER ("" = the world's)
    eval_prompts: str = ""  # held-out prompts: a FILE or a FOLDER's test split ("" = --prompts folder's, or built-in)
    advantage: str = "stepwise"  # the credit (stepgrpo.CREDITS): stepwise (gains g_k, §4) | flow_grpo (final reward)
    per_step_norm: bool = False  # normalise gains per step instead of jointly (the paper's slower ablation)
    global_std: bool = False  # divide advantages by the whole batch's std, not the group's (choice 10)
    sampler: str = "ddim"  # ddim (the paper's DDIM-inspired SDE) | flow_grpo (Flow-GRPO's SDE), §2
    eta: float = 0.9  # η, DDIM-SDE noise scale, 0 < eta < 1 (0 is the ODE); 0.9 by measurement (choice 3)
    noise_level: float = 0.7  # a, Flow-GRPO SDE noise level > 0 (Flow-GRPO: 0.7)
    std_floor: float = 0.1  # train only steps whose std >= std_floor x the largest (0: every random step), choice 2
    shared_noise: bool = True  # a group shares its initial noise x_T (§3); false: Flow-GRPO's own (choice 6)
    num_steps: int = 10  # T, sampling steps in training
    shift: float = 3.0  # schedule shift (SD3.5: 3)
    tweedie_substeps: int = 5  # T', Euler substeps of x0_est (§3; 1 = plain Tweedie; the paper: 5)
    guidance: float = 0.0  # CFG scale g >= 1 in rollout, training and x0_est (0 = the world's: toy 1, SD3 4.5)
    uncond_grad: bool = False  # back-propagate through CFG's unconditional branch too (choice 14: false)
    group_size: int = 8  # N, trajectories per prompt (>= 2)
    prompts_per_step: int = 8  # G, prompts per iteration
    steps: int = 60  # training iterations
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clip
    clip_range: float = 1e-4  # ε of the ratio clip (tiny: log-probs are averaged over elements)
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip] (choice 9)
    beta: float = 0.01  # β, weight of the |dt|-weighted KL to the base model, §5 (0 = no reference forward)
    lora_rank: int = 32  # LoRA rank r
    lora_alpha: int = 64  # LoRA alpha
    micro_batch: int = 8  # trajectories per forward pass, in sampling and in training
    updates_per_iteration: int = 2  # U, optimizer steps per iteration, each over 1/U of every group (choice 11)
    tweedie_batch: int = 0  # states per x0_est forward (0 = all distinct states of the iteration at once)
    ema_decay: float = 0.0  # EMA of the LoRA for evaluation and saving, 0 <= decay < 1 (0 = off), choice 15
    ema_every: int = 8  # optimizer steps between EMA updates (Flow-GRPO: 8)
    eval_every: int = 10  # iterations between held-out evaluations
    eval_steps: int = 40  # ODE steps of the evaluation sampler
    eval_repeats: int = 1  # held-out samples per held-out prompt, each from its own noise
    save_every: int = 10  # iterations between checkpoints
    seed: int = 0  # seeds prompts, noises and the LoRA init
    out: str = "runs/latest"  # output folder
    log_to: str = "none"  # none | tensorboard | wandb: every logged key and the sample grids there too
    resume: bool = False  # continue from out/ckpt.pt (none there yet: start afresh, saying so)
    pretrain_steps: int = 0  # toy only: base-model pretraining steps (0 = toy's default)
    cache_dir: str = ".cache/toy"  # toy only: where a pretrained base model is cached (keyed by its config)
    resolution: int = 512  # SD3 only: image side in pixels
    gradient_checkpointing: bool = False  # SD3 only: trade compute for memory in training
    text_encoders: str = "auto"  # SD3 only: auto | precompute | resident | offload (choice 21)


TEXT_ENCODERS = ("auto", "precompute", "resident", "offload")  # what sd3.SD3World acts on (choice 21)


def choices():
    """The valid values of the enumerated flags; credits are read from stepgrpo.CREDITS, so a new one is a flag."""
    return {"advantage": tuple(stepgrpo.CREDITS), "sampler": sde.SAMPLERS, "text_encoders": TEXT_ENCODERS,
            "log_to": tracking.TRACKERS}


def toy(cfg):
    """CPU-sized: a 0.6M-parameter model, about a second per iteration (choice 30: each value measured)."""
    return dataclasses.replace(cfg, lora_rank=8, lora_alpha=16, lr=3e-3, micro_batch=32, prompts_per_step=8,
                               group_size=8, tweedie_substeps=2, eval_steps=20, eval_repeats=4, eval_every=10,
                               steps=80, beta=0.04)


def sd35(cfg):
    """The paper's setting on one GPU (choice 16): Flow-GRPO's group of 8 on one GPU and its EMA (decay 0.9 every 8
    steps), bounded memory for x0_est."""
    return dataclasses.replace(cfg, reward="pickscore", micro_batch=8, tweedie_batch=16, prompts_per_step=4,
                               ema_decay=0.9, reward_batch=32)


def flow_grpo_method(cfg):
    """The baseline as Flow-GRPO's SD3 configs run it (choice 6): global_std=True, an initial noise per trajectory."""
    return dataclasses.replace(cfg, global_std=True, shared_noise=False)


class UsageError(UserError, ValueError):
    """A flag whose value cannot work; the message names it and its valid values."""


def _boolean(text):
    """true/false, 1/0, yes/no, and nothing else: a typo must not read as false."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true/false, 1/0 or yes/no")
    return value


def _comments():
    """Each Config field's inline comment, read from this file's source: the flag's --help."""
    found = re.findall(r"^\s+(\w+): [^=]+=.*?  # (.*)$", inspect.getsource(Config), re.M)
    return dict(found)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    """Flags from Config's fields (--group-size); presets of --model and --advantage first, given flags last."""
    p = Parser(prog="train.py", description="Stepwise-Flow-GRPO and Flow-GRPO training (arXiv:2603.28718). "
               "Presets: toy or sd35 by --model, flow_grpo_method by --advantage flow_grpo; given flags win.")
    comments = _comments()
    valid = choices()
    for f in dataclasses.fields(Config):
        kind = _boolean if f.type is bool else f.type
        metavar = None if f.name in valid else f.type.__name__.upper()
        meaning = comments[f.name] + ("; rewards: " + ", ".join(rewards.REWARDS) if f.name == "reward" else "")
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None, choices=valid.get(f.name),
                       metavar=metavar, help=f"{meaning} (default {f.default!r})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = Config(model=given.get("model", "toy"))
    cfg = toy(cfg) if cfg.model == "toy" else sd35(cfg)
    if given.get("advantage") == "flow_grpo":
        cfg = flow_grpo_method(cfg)
    return dataclasses.replace(cfg, **given)


def check(cfg):
    """Every flag checked before any work: a UsageError naming the flag and its valid values."""
    rules = [
        ("group_size", cfg.group_size >= 2, ">= 2 (a group needs two trajectories to compare)"),
        ("prompts_per_step", cfg.prompts_per_step >= 1, ">= 1"),
        ("steps", cfg.steps >= 1, ">= 1"),
        ("lr", cfg.lr > 0, "> 0"),
        ("clip_range", cfg.clip_range > 0, "> 0"),
        ("beta", cfg.beta >= 0, ">= 0"),
        ("adv_clip", cfg.adv_clip > 0, "> 0"),
        ("max_grad_norm", cfg.max_grad_norm > 0, "> 0"),
        ("eta", cfg.eta >= 0, ">= 0"),
        ("noise_level", cfg.noise_level >= 0, ">= 0"),
        ("std_floor", 0 <= cfg.std_floor <= 1, "in [0, 1]"),
        ("num_steps", cfg.num_steps >= 2, ">= 2"),
        ("tweedie_substeps", cfg.tweedie_substeps >= 1, ">= 1"),
        ("shift", cfg.shift > 0, "> 0"),
        ("guidance", cfg.guidance == 0 or cfg.guidance >= 1, ">= 1, or 0 for the world's default"),
        ("micro_batch", cfg.micro_batch >= 1, ">= 1"),
        ("updates_per_iteration", cfg.updates_per_iteration >= 1, ">= 1"),
        ("updates_per_iteration", cfg.group_size % max(cfg.updates_per_iteration, 1) == 0,
         f"a divisor of --group-size {cfg.group_size}: each update takes the same share of every group"),
        ("tweedie_batch", cfg.tweedie_batch >= 0, ">= 0"),
        ("lora_rank", cfg.lora_rank >= 1, ">= 1"),
        ("lora_alpha", cfg.lora_alpha >= 1, ">= 1"),
        ("ema_decay", 0 <= cfg.ema_decay < 1, "in [0, 1) (0 = off)"),
        ("ema_every", cfg.ema_every >= 1, ">= 1"),
        ("eval_every", cfg.eval_every >= 1, ">= 1"),
        ("eval_steps", cfg.eval_steps >= 1, ">= 1"),
        ("eval_repeats", cfg.eval_repeats >= 1, ">= 1"),
        ("reward_batch", cfg.reward_batch >= 0, ">= 0 (0 = all images at once)"),
        ("save_every", cfg.save_every >= 1, ">= 1"),
        ("pretrain_steps", cfg.pretrain_steps >= 0, ">= 0 (0 = the toy's default)"),
        ("resolution", cfg.resolution >= 1, ">= 1"),
    ]
    rules += [(name, getattr(cfg, name) in valid, " or ".join(valid)) for name, valid in choices().items()]
    for name in ("prompts", "eval_prompts"):
        rules.append((name, getattr(cfg, name) == "" or os.path.exists(getattr(cfg, name)),
                      "an existing file, one prompt a line, or a Flow-GRPO dataset folder"))
    for name, ok, valid in rules:
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(cfg, name)!r} is invalid: must be {valid}")
    tracking.check(cfg.log_to)
    try:
        rewards.parse(cfg.reward or "pickscore")
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        trained = policy(cfg).trained
    except ValueError as e:  # an eta for which sigma reaches s
        raise UsageError(f"--eta: {e}") from None
    if not trained:  # every step deterministic: nothing to train, and no loss to average
        noise = "eta" if cfg.sampler == "ddim" else "noise_level"
        if getattr(cfg, noise) == 0:
            raise UsageError(f"--{noise.replace('_', '-')}={getattr(cfg, noise)!r} is invalid: the {cfg.sampler} "
                             "sampler is then the ODE and has no random step to train; give a value > 0")
        raise UsageError(f"--num-steps={cfg.num_steps} is invalid: the ddim sampler's first and last steps are "
                         "deterministic, so it has no random step to train; give >= 3")


def policy(cfg, guidance=1.0):
    """The training policy the flags describe (sde.policy): sampler, schedule, noise scale, std floor, guidance."""
    noise = cfg.eta if cfg.sampler == "ddim" else cfg.noise_level
    return sde.policy(cfg.sampler, sde.sigmas(cfg.num_steps, cfg.shift), noise, guidance, cfg.std_floor)

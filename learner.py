"""The learner of train.py (METHOD.md §2, §5): the sampler as a Gaussian policy, the LoRA it trains, the GRPO
loss's gradient, the optimizer steps, and the EMA of the LoRA.

    backward    objective = mean over (i, k) of min(A rho, A clip(rho, 1 - eps, 1 + eps)) - beta KL,  loss = -objective
    update      U optimizer steps an iteration, each accumulating its micro-batches' gradients (train.py, choice 1)

Notation: k -> a sampling step (state k -> k+1), rho -> the ratio p_theta / p_old of a transition, A -> its
advantage, eps -> clip_range, beta -> the weight of the |dt|-weighted KL (stepgrpo.kl_penalty).
Choices (train.py lists them all): 4 (steps of tiny std left out), 5 (LoRA targets), 6 (CFG's unconditional
branch detached), 7 (EMA).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from peft import LoraConfig

import parallel
import sde
import stepgrpo
from worlds import base_model, rows

LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # choice 5


@dataclass
class Policy:
    """The sampler as a Gaussian policy (METHOD §2): the schedule's T+1 levels, its step, the steps it trains."""
    levels: torch.Tensor  # (T+1,)
    step_fn: object  # sde.ddim_step or sde.flow_grpo_step with its noise bound
    trained: list  # the steps k (state k -> k+1) in the loss

    def step(self, k, x_t, v, prev_sample=None, noise=None):
        return self.step_fn(x_t, v, self.levels[k], self.levels[k + 1], prev_sample=prev_sample, noise=noise)


def policy(cfg):
    """The policy of cfg's sampler; steps of std 0 (deterministic: no log-prob) and of tiny std (choice 4) are left
    out of the loss."""
    levels = sde.sigmas(cfg.num_steps, cfg.shift)
    bound = {"eta": cfg.eta} if cfg.sampler == "ddim" else {"noise_level": cfg.noise_level}
    step_fn = partial(sde.SAMPLERS[cfg.sampler], **bound)
    stds = step_fn(torch.zeros(cfg.num_steps, 1), torch.zeros(cfg.num_steps, 1), levels[:-1], levels[1:],
                   noise=torch.zeros(cfg.num_steps, 1))[3]
    trained = [k for k in range(cfg.num_steps) if stds[k] > 0 and stds[k] >= cfg.std_floor * stds.max()]
    return Policy(levels, step_fn, trained)


def add_lora(transformer, cfg):
    """peft's LoRA on Flow-GRPO's targets (choice 5); returns its parameters, the trained ones."""
    transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights in float32 even on a bf16 model: Adam's small updates survive
    return params


class EMA:
    """Flow-GRPO's EMA of the trained parameters (its flow_grpo/ema.py): after optimizer step n, every `every`
    steps, ema += (1 - d) (p - ema) with d = min((1 + n) / (10 + n), decay), so early averages forget the init
    fast. decay 0 turns it off: swapped() then leaves the live weights in place."""

    def __init__(self, params, decay, every):
        self.params = params
        self.decay = decay
        self.every = every
        self.steps = 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self):
        n = self.steps
        self.steps += 1
        if self.decay == 0 or (n + 1) % self.every:
            return
        d = min((1 + n) / (10 + n), self.decay)
        for s, p in zip(self.shadow, self.params):
            s.add_((1 - d) * (p - s))

    @contextmanager
    def swapped(self):
        """The averaged weights in place of the live ones, for evaluation and saving."""
        live = [p.detach().clone() for p in self.params]
        if self.decay > 0:
            for p, s in zip(self.params, self.shadow):
                p.data.copy_(s)
        try:
            yield
        finally:
            for p, w in zip(self.params, live):
                p.data.copy_(w)

    def state_dict(self):
        return dict(steps=self.steps, shadow=self.shadow)

    def load_state_dict(self, state):
        self.steps = state["steps"]
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


def backward(world, policy, batch, c, guidance, cfg, weight):
    """Gradient of the GRPO loss (§5) of micro-batch c (a slice of trajectories), accumulated in .grad transition by
    transition, scaled by `weight`: PPO-clip plus beta x the |dt|-weighted KL to the LoRA-free base. Returns the
    stats of each trained transition."""
    velocity = partial(world.velocity, cond=rows(batch["cond"], c), guidance=guidance)
    states, old, adv = batch["states"][c], batch["log_probs"][c], batch["adv"][c]
    stats = []
    for k in policy.trained:
        x_t = states[:, k]
        t = policy.levels[k].expand(len(x_t)).to(x_t.device)
        v = velocity(x_t, t, detach_uncond=not cfg.uncond_grad)  # choice 6
        _, log_prob, mean, std = policy.step(k, x_t, v, prev_sample=states[:, k + 1])
        # objective = mean over (i, k) of min(A rho, A clip(rho)) - beta KL: over the micro-batch's trajectories
        # here, over the trained steps and the update's micro-batches through `weight`; loss = -objective
        policy_loss = stepgrpo.grpo_loss(log_prob, old[:, k], adv[:, k], cfg.clip_range)
        kl = torch.zeros(())
        if cfg.beta > 0:
            with torch.no_grad(), base_model(world.transformer):  # prev_sample given: no noise is needed
                ref_mean = policy.step(k, x_t, velocity(x_t, t), prev_sample=x_t)[2]
            kl = stepgrpo.kl_penalty(mean, ref_mean, std, policy.levels[k] - policy.levels[k + 1]).mean()
        loss = policy_loss + cfg.beta * kl
        (weight * loss).backward()
        stats.append(dict(stepgrpo.policy_stats(log_prob, old[:, k], cfg.clip_range), loss=loss.item(),
                          policy_loss=policy_loss.item(), kl=kl.item()))
    return stats


def update(world, opt, ema, policy, batch, plan, guidance, cfg):
    """The GRPO update: one optimizer step per entry of plan (choice 1), accumulating its micro-batches' gradients.
    Returns per-transition stats and, per optimizer step, whether its loss was finite (else it is skipped)."""
    world.transformer.train()
    params = [p for group in opt.param_groups for p in group["params"]]
    stats, finite = [], []
    for micro in plan:
        n = sum(c.stop - c.start for c in micro)
        mine = []
        for c in micro:
            mine += backward(world, policy, batch, c, guidance, cfg, (c.stop - c.start) / (n * len(policy.trained)))
        # a non-finite loss on any rank skips the step on all; main stops the run after 3 in a row
        finite.append(parallel.all_true(all(math.isfinite(s["loss"]) for s in mine)))
        if finite[-1]:
            parallel.average_gradients(params)  # the whole batch's gradient (parallel.py)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            ema.step()
        opt.zero_grad(set_to_none=True)
        stats += mine
    return stats, finite

"""Stepwise-Flow-GRPO's method: groups sharing x_T, intermediate rewards, gains, advantages, the GRPO update.

METHOD.md §3-5 (paper: Stepwise-Flow-GRPO, arXiv:2603.28718; baseline Flow-GRPO, arXiv:2505.05470). train.py
calls one function a phase; sampling itself (the Gaussian policy and its rollouts) is in sde.py.

    sample_groups          G prompts x N trajectories, a group from one x_T (r_0 shared)                   (§3)
    x0_estimates           x0_est(x^(k)) of every state: T' Euler substeps to t = 0 (sde.ode_x0)           (§3)
    rewards                r_k = R(decode(x0_est(x^(k))), c), k = 0..T; r_T the final image's reward        (§3)
    gains                  g_k = r_{k+1} - r_k, k = 0..T-1; sum_k g_k = r_T - r_0                           (§4)
    stepwise_advantages    A_k^i = (g_k^i - mean_G(g)) / (std_G(g) + eps), over the group's N T gains jointly (§4)
    flow_grpo_advantages   A^i = (r_T^i - mean_G(r_T)) / (std(r_T) + eps), the same A^i for every step          (§4)
    CREDITS                the credits by name (--advantage): a new one is a function and an entry          (§4)
    grpo_loss              mean over (i, k) of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = pi/pi_old     (§5)
    kl_penalty             |dt| KL(N(mean, std^2) || N(ref_mean, std^2)) = |dt| |mean - ref_mean|^2 / (2 std^2) (§5)
    update                 the clipped loss plus beta KL, backward transition by transition, U optimizer steps (§5)

Notation: rewards -> r_k (B, T+1) in sampling order (index 0 = the estimate from the initial noise, index T = the
final image), gains -> g_k (B, T), groups -> the prompt group of each trajectory (B,), clip_range -> eps.
B trajectories, G prompt groups, N trajectories a group, T sampling steps, K rewards a trajectory.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch

import batching
import sde
from world import base_model

EPS = 1e-4  # Flow-GRPO's epsilon in the std denominator: a group whose rewards are all equal gets advantage 0


# ---------------------------------------------------------------------------------------- sampling groups (§3)
@dataclass
class Batch:
    """An iteration's trajectories, in the order the update takes them (choice 11)."""
    prompts: list  # (B,) each trajectory's prompt
    groups: torch.Tensor  # (B,) its prompt group
    cond: dict  # the world's encoding of the prompts, batch-first
    states: torch.Tensor  # (B, T+1, ...) x^(0) = x_T, the noise, ... x^(T), the final sample
    log_probs: torch.Tensor  # (B, T) log pi_old(x^(k+1) | x^(k)), at sampling
    velocities: torch.Tensor  # (B, T, ...) v_theta at each state, reused by x0_est (choice 4)
    plan: list  # per optimizer step, the micro-batches (slices of trajectories) it accumulates
    advantages: torch.Tensor = None  # (B, T) A_k^i, once computed (§4)


def velocity_of(world, policy, cond, rows):
    """v(x, t) = v_theta(x_t, t, c) for the given rows of an encoding, at the policy's guidance."""
    return partial(world.velocity, cond={k: v[rows] for k, v in cond.items()}, guidance=policy.guidance)


def sample(world, policy, cond, x1, noise, micro_batches):
    """Rollouts of the policy (sde.rollout) in the given micro-batches. Training re-scores the very same micro-batches,
    so each transition is recomputed with the same floats: on-policy, the ratio is exactly 1."""
    outs = []
    for c in micro_batches:
        velocity = velocity_of(world, policy, cond, c)
        outs.append(sde.rollout(velocity, x1[c], policy, None if noise is None else noise[c]))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def sample_groups(world, policy, cfg, it, group_ids):
    """Iteration `it`'s G training prompts, drawn at random, and N trajectories of each; every group starts from one
    x_T (§3), so its r_0 is shared. Only the groups `group_ids` are sampled (under torchrun, this rank's)."""
    N = cfg.group_size
    U = cfg.updates_per_iteration
    drawn = batching.draw_prompts(len(world.train_prompts), cfg.prompts_per_step, cfg.seed, it)
    noises = [batching.group_noise(cfg, world.latent_shape, it, g) for g in group_ids]
    order = batching.update_order(len(group_ids), N, U)  # (B,) each optimizer step's trajectories together
    x1 = torch.cat([x for x, _ in noises])[order].to(world.device)
    noise = torch.cat([n for _, n in noises])[order]
    groups = torch.tensor(list(group_ids)).repeat_interleave(N)[order]
    prompts = [world.train_prompts[drawn[g]] for g in groups.tolist()]
    cond = world.encode(prompts)
    plan = batching.micro_batches(len(groups), U, cfg.micro_batch)
    out = sample(world, policy, cond, x1, noise, [c for u in plan for c in u])
    return Batch(prompts, groups, cond, out["states"], out["log_probs"], out["velocities"], plan)


# -------------------------------------------------------------------------------- intermediate rewards (§3)
@torch.no_grad()
def x0_estimates(world, batch, policy, substeps, chunk=0):
    """x0_est(x^(k)) of every state k = 0..T -> (B, T+1, ...), the last being the final image itself, and source
    (B, T+1): the trajectory whose estimate each state shares (batching.first_copies).

    Plainly, it is sde.ode_x0 of all B T states at once. The saving (choice 5): a state that repeats another of its
    group bit for bit shares its estimate, so only the distinct states go through the model, in chunks of `chunk`
    (0: all at once), and each repeat then copies its source's estimate."""
    B, T = batch.log_probs.shape
    source = batching.first_copies(batch.states[:, :T], batch.groups)  # (B, T)
    b, k = batching.distinct(source)  # (R,) trajectory and step of each distinct state
    x0 = torch.empty_like(batch.states[:, :T])
    for c in batching.chunks(len(b), chunk):
        velocity = velocity_of(world, policy, batch.cond, b[c])
        x_t = batch.states[b[c], k[c]]
        v = batch.velocities[b[c], k[c]]  # the rollout's velocity at x_t: the first substep's (choice 4)
        x0[b[c], k[c]] = sde.ode_x0(velocity, x_t, policy.levels[k[c]], substeps, v=v)
    x0 = x0[source, torch.arange(T)]  # each repeat takes its source's estimate
    source = torch.cat([source, torch.arange(B)[:, None]], 1)  # every final image is its own
    return torch.cat([x0, batch.states[:, T:]], 1), source


@torch.no_grad()
def rewards(world, reward_fn, x0, prompts, source=None):
    """r_k = R(decode(x0_est(x^(k))), c) for estimates x0 (B, K, ...) -> (B, K) on the CPU, and the decoded images
    (the distinct ones, trajectory-major). source (B, K), from x0_estimates: a repeat is neither decoded nor scored."""
    B, K = x0.shape[:2]
    source = torch.arange(B)[:, None].expand(B, K) if source is None else source
    b, k = batching.distinct(source)
    images = torch.cat([world.decode(x0[b[c], k[c]]) for c in batching.chunks(len(b), 64)])
    r = torch.empty(B, K)
    r[b, k] = reward_fn(images, [prompts[i] for i in b.tolist()]).float().cpu()
    return r[source, torch.arange(K)], images


# ------------------------------------------------------------------------------------- gains and advantages (§4)
def gains(rewards):
    """Gain of each sampling step: how much step k -> k+1 raised the reward of the Tweedie estimate."""
    return rewards[:, 1:] - rewards[:, :-1]  # (B, T)


def group_normalise(values, groups, per_column=False, global_std=False, eps=EPS):
    """(values - group mean) / (std + eps), over all of a group's entries, or per column if per_column.

    values (B, ...) with groups (B,) integer ids; the population std (unbiased=False), over the group's entries, or
    over the whole batch's if global_std (choice 10: the mean stays the group's)."""
    dims = 0 if per_column else tuple(range(values.dim()))
    batch_std = values.std(dim=dims, unbiased=False, keepdim=per_column)
    out = torch.empty_like(values)
    for g in torch.unique(groups):
        rows = values[groups == g]
        mean = rows.mean(dim=dims, keepdim=per_column)
        std = batch_std if global_std else rows.std(dim=dims, unbiased=False, keepdim=per_column)
        out[groups == g] = (rows - mean) / (std + eps)
    return out


def stepwise_advantages(rewards, groups, *, per_step=False, global_std=False, adv_clip=5.0):
    """Stepwise-Flow-GRPO's advantages (B, T) from rewards (B, T+1): the gains, normalised jointly within each
    prompt's group, clipped to [-adv_clip, adv_clip] (choice 9). A std-0 step's gain takes part too (choice 1).
    per_step=True normalises each step's gains over the group separately: the ablation the paper found slower."""
    normalised = group_normalise(gains(rewards), groups, per_column=per_step, global_std=global_std)
    return normalised.clamp(-adv_clip, adv_clip)


def flow_grpo_advantages(rewards, groups, *, per_step=False, global_std=False, adv_clip=5.0):
    """Flow-GRPO's advantages (B, 1) from rewards (B, K), of which only the last, the final image's, counts: its
    reward relative to its prompt's group, credited to every step. per_step changes nothing for one column."""
    normalised = group_normalise(rewards[:, -1:], groups, per_column=per_step, global_std=global_std)
    return normalised.clamp(-adv_clip, adv_clip)


class Credit(NamedTuple):
    advantages: Callable  # (rewards (B, K), groups (B,), *, per_step, global_std, adv_clip) -> (B, T) or (B, 1)
    intermediate: bool  # rewards of every state's estimate (K = T+1), or of the final image only (K = 1, choice 8)


CREDITS = {
    "stepwise": Credit(stepwise_advantages, intermediate=True),  # each step credited with its own gain
    "flow_grpo": Credit(flow_grpo_advantages, intermediate=False),  # the baseline: the final reward, every step
}


# ----------------------------------------------------------------------------- the clipped objective (§5)
def grpo_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO-clip surrogate to MINIMISE, averaged over all entries given (the caller leaves out std-0 steps).

    All three tensors have one shape, e.g. (B,) for one step. On-policy the ratio is exactly 1 (the transition is
    re-scored with the weights that sampled it), so the value is -mean(A) and the gradient -A * d log_prob.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def kl_penalty(mean, ref_mean, std, dt):
    """|dt| x the KL between the policy's and the reference's Gaussians of one std, averaged over elements -> (B,).

    The |dt| weighting is Flow-GRPO's (choice 12): for its SDE, std^2 = sigma_t^2 |dt|, so this is its
    |mean - ref_mean|^2 / (2 sigma_t^2) exactly and its beta values carry over; the same weighting for the DDIM
    SDE makes one beta mean the same for both samplers.
    """
    sq = ((mean.float() - ref_mean.float()) ** 2).mean(dim=tuple(range(1, mean.dim())))
    return abs(float(dt)) * sq / (2 * std.float() ** 2)


@torch.no_grad()
def policy_stats(log_prob, old_log_prob, clip_range):
    """Diagnostics as Flow-GRPO logs them: approx KL 0.5 E[(log rho)^2], clip fraction, mean ratio."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    return dict(approx_kl=0.5 * (log_ratio**2).mean().item(),
                clip_frac=((ratio - 1).abs() > clip_range).float().mean().item(),
                ratio=ratio.mean().item())


def backward(world, policy, batch, rows, weight, cfg):
    """Accumulate in .grad the gradient of the GRPO loss of the trajectories `rows` (a slice), transition by
    transition, each scaled by `weight`: PPO-clip plus beta x the KL to the LoRA-free base. Returns each trained
    transition's stats."""
    velocity = velocity_of(world, policy, batch.cond, rows)
    states = batch.states[rows]  # (b, T+1, ...)
    old = batch.log_probs[rows]  # (b, T)
    adv = batch.advantages[rows]  # (b, T)
    stats = []
    for k in policy.trained:
        x_t = states[:, k]
        x_s = states[:, k + 1]
        t = policy.levels[k].expand(len(x_t)).to(x_t.device)
        v = velocity(x_t, t, detach_uncond=not cfg.uncond_grad)  # choice 14
        _, log_prob, mean, std = policy.step(k, x_t, v, prev_sample=x_s)  # re-scores the stored transition
        policy_loss = grpo_loss(log_prob, old[:, k], adv[:, k], cfg.clip_range)
        kl = torch.zeros(())
        if cfg.beta > 0:
            with torch.no_grad(), base_model(world.transformer):
                ref_mean = policy.step(k, x_t, velocity(x_t, t), prev_sample=x_s)[2]
            kl = kl_penalty(mean, ref_mean, std, policy.levels[k] - policy.levels[k + 1]).mean()
        # loss = -objective, objective = mean over (i, k) of min(A rho, A clip(rho)) - beta KL: the mean over the
        # micro-batch's trajectories here, over the trained steps and the update's micro-batches through `weight`
        loss = policy_loss + cfg.beta * kl
        (weight * loss).backward()
        stats.append(dict(policy_stats(log_prob, old[:, k], cfg.clip_range), loss=loss.item(),
                          policy_loss=policy_loss.item(), kl=kl.item()))
    return stats


def update(world, lora, policy, batch, cfg):
    """The GRPO update: one optimizer step per entry of batch.plan (choice 11), each accumulating the gradient of
    its micro-batches. Returns per-transition stats and, per optimizer step, whether it was taken (a non-finite
    loss skips it: lora.LoRA.step)."""
    world.transformer.train()
    stats, taken = [], []
    for micro_batches in batch.plan:
        n = sum(c.stop - c.start for c in micro_batches)
        step = []
        for c in micro_batches:
            weight = (c.stop - c.start) / (n * len(policy.trained))  # this micro-batch's share of the step's mean
            step += backward(world, policy, batch, c, weight, cfg)
        taken.append(lora.step(all(math.isfinite(s["loss"]) for s in step)))
        stats += step
    return stats, taken

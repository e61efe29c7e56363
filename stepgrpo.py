"""Credit assignment and the GRPO update: stepwise gains, group-relative advantages, the clipped loss and the KL.

Implements METHOD.md §4-5 (paper: Stepwise-Flow-GRPO, arXiv:2603.28718; baseline Flow-GRPO, arXiv:2505.05470).

    gains                  g_k = r_{k+1} - r_k, k = 0..T-1; sum_k g_k = r_T - r_0                         (§4)
    stepwise_advantages    A_k^i = (g_k^i - mean_G(g)) / (std_G(g) + eps), over the group's N*T gains jointly (§4)
    flow_grpo_advantages   A^i = (R^i - mean_G(R)) / (std(R) + eps), the same A^i for every step              (§4)
    grpo_loss              mean over (i, k) of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = p_theta/p_old (§5)
    kl_penalty             |dt| KL(N(mean, std^2) || N(ref_mean, std^2)) = |dt| |mean - ref_mean|^2 / (2 std^2)  (§5)

Notation: rewards -> r_k (B, T+1) in sampling order (index 0 = the Tweedie estimate from the initial noise,
index T = the final image), gains -> g_k (B, T), groups -> the prompt id of each trajectory (B,), clip_range -> eps.
B trajectories, G prompt groups, T sampling steps.

Steps whose std is 0 (the DDIM-inspired SDE's first and last steps) have no log-probability: the CALLER leaves
them out of grpo_loss and kl_penalty; their gains still take part in the joint normalisation (METHOD §4 normalises
all N*T gains), which keeps the telescoping identity exact.
Advantages are clipped to [-adv_clip, adv_clip] (Flow-GRPO: 5) for both methods, so the comparison is fair.
global_std (Flow-GRPO's SD3 configs: on) divides by the std over the whole batch's entries instead of the group's;
the mean stays the group's, so a prompt's credit is still relative to its own group.
"""
import torch

EPS = 1e-4  # Flow-GRPO's epsilon in the std denominator: a group whose rewards are all equal gets advantage 0


def gains(rewards):
    """Gain of each sampling step: how much step k -> k+1 raised the reward of the Tweedie estimate."""
    return rewards[:, 1:] - rewards[:, :-1]  # (B, T)


def group_normalise(values, groups, per_column=False, global_std=False, eps=EPS):
    """(values - group mean) / (std + eps), over all of a group's entries, or per column if per_column.

    values (B, ...) with groups (B,) integer ids; the population std (unbiased=False), as METHOD §4 says, of the
    group's entries, or of the whole batch's if global_std.
    """
    dims = 0 if per_column else tuple(range(values.dim()))
    batch_std = values.std(dim=dims, unbiased=False, keepdim=per_column)
    out = torch.empty_like(values)
    for g in torch.unique(groups):
        rows = values[groups == g]
        mean = rows.mean(dim=dims, keepdim=per_column)
        std = batch_std if global_std else rows.std(dim=dims, unbiased=False, keepdim=per_column)
        out[groups == g] = (rows - mean) / (std + eps)
    return out


def stepwise_advantages(rewards, groups, per_step=False, adv_clip=5.0, global_std=False):
    """Stepwise-Flow-GRPO's advantages (B, T): gains normalised jointly within each prompt's group.

    per_step=True normalises each step's gains over the group separately: the ablation the paper found slower.
    """
    normalised = group_normalise(gains(rewards), groups, per_column=per_step, global_std=global_std)
    return normalised.clamp(-adv_clip, adv_clip)


def flow_grpo_advantages(final_rewards, groups, global_std=False, adv_clip=5.0):
    """Flow-GRPO's advantages (B,): the final reward relative to its prompt's group, credited to every step."""
    return group_normalise(final_rewards, groups, global_std=global_std).clamp(-adv_clip, adv_clip)


def grpo_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO-clip surrogate to MINIMISE, averaged over all entries given (the caller drops std-0 steps).

    All three tensors have one shape, e.g. (B,) for one step. On-policy the ratio is exactly 1 (the transition is
    re-scored with the weights that sampled it), so the value is -mean(A) and the gradient -A * d log_prob.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def kl_penalty(mean, ref_mean, std, dt):
    """|dt| x the KL between the policy's and the reference's Gaussians of one std, averaged over elements -> (B,).

    The |dt| weighting is Flow-GRPO's (METHOD §5): for its SDE, std^2 = sigma_t^2 |dt|, so this is its
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

"""Sampling as a Gaussian policy: the schedule, Tweedie's estimates, the two SDE samplers, rollouts, x0_est.

METHOD.md §1-2 and the estimate of §3 (paper: Stepwise-Flow-GRPO, arXiv:2603.28718; baseline Flow-GRPO,
arXiv:2505.05470). Time runs from t = 1 (noise x1) to t = 0 (image x0); x_t = (1 - t) x0 + t x1, v ~ x1 - x0.

    sigmas            SD3's shifted schedule: T+1 levels from 1 to 0                                   (§1)
    tweedie           x0_hat = x_t - t v,  x1_hat = x_t + (1 - t) v                                    (§1)
    flow_grpo_step    Flow-GRPO's SDE: sigma_t = a sqrt(t / (1 - t)), std = sigma_t sqrt(-dt)           (§2)
    ddim_step         DDIM-inspired SDE: sigma = eta s sqrt(1 - t), std = sigma,
                      mean = (1 - s) x0_hat + sqrt(s^2 - sigma^2) x1_hat                               (§2)
    policy, rollout   the sampler as a policy pi(x_s | x_t, c) = N(mean, std^2 I); whole trajectories     (§2)
    ode_x0            x0_est: T' Euler substeps from t down to 0                                       (§3)

Notation: x_t -> x_t, prev_sample -> x_s (s < t, the next, less noisy level), v -> v_theta(x_t, t, c) (with CFG),
eta -> η, noise_level -> a, levels -> the schedule t_0 = 1 > ... > t_T = 0. B batch, T sampling steps.
A step returns (x_s, log_prob, mean, std): log_prob is the Gaussian log-density AVERAGED over the non-batch
elements (Flow-GRPO's convention, hence its tiny clip range); a step of std 0 has log_prob 0 (choice 1).
"""
import math
from dataclasses import dataclass
from functools import partial

import torch


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def sigmas(num_steps, shift=3.0):
    """SD3's shifted schedule: T+1 levels from 1 to 0, as FlowMatchEulerDiscreteScheduler(shift) builds them."""
    # diffusers spaces T levels linearly from 1 to the training schedule's smallest level (1/1000, shifted),
    # shifts them (again), then appends 0: hence .0089 rather than a plain linspace's last level at T = 10.
    s_min = _shift(torch.tensor(1 / 1000, dtype=torch.float64), shift)
    s = torch.linspace(1.0, float(s_min), num_steps, dtype=torch.float64)
    return torch.cat([_shift(s, shift), torch.zeros(1, dtype=torch.float64)]).float()  # (T+1,)


def _per_sample(t, x):
    """A float or (B,) tensor of times, as float64 shaped to broadcast against x (B, ...)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def tweedie(x_t, v, t):
    """Posterior-mean estimates of the image and the noise from one velocity (§1)."""
    t = _per_sample(t, x_t)
    return x_t - t * v, x_t + (1 - t) * v


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2 I) averaged over the non-batch elements -> (B,); std is (B,), and 0 gives 0 (choice 1)."""
    std = std.reshape(-1, *([1] * (x.dim() - 1)))
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    return torch.where(std.flatten() > 0, lp.mean(dim=tuple(range(1, x.dim()))), 0.0)


def _gaussian_step(mean, std, x_t, prev_sample, noise):
    """x_s = mean + std * noise (or the stored x_s) and its score; float64 inside, x_t's dtype out.

    noise None is allowed only where std is 0 (the ODE): a random step must never run on forgotten noise."""
    if prev_sample is None and noise is None:
        if (std > 0).any():
            raise ValueError("a step of std > 0 needs its noise")
        prev_sample = mean
    if prev_sample is None:
        prev_sample = (mean + std * noise.to(x_t.device, torch.float64)).to(x_t.dtype)
    # Score the sample as stored (rounded to x_t's dtype), so that re-scoring it later gives the same number.
    log_prob = gaussian_log_prob(prev_sample.double(), mean, std.flatten())
    return prev_sample.to(x_t.dtype), log_prob.float(), mean.to(x_t.dtype), std.flatten().float()


def flow_grpo_sigma(t, s, noise_level):
    """sigma_t = a sqrt(t / (1 - t)); it blows up at t = 1, where Flow-GRPO takes the next level s instead (§2)."""
    return noise_level * torch.sqrt(t / (1 - torch.where(t == 1, s, t)))


def flow_grpo_step(x_t, v, t, s, noise_level, prev_sample=None, noise=None):
    """Flow-GRPO's SDE step t -> s (§2); noise_level = a (0.7 in Flow-GRPO)."""
    # float64: bf16 overflows in sigma_t^2 / (2t) near t = 1, and the log-ratio of two float32 log-probs is noisy.
    x, v = x_t.double(), v.double()
    t, s = _per_sample(t, x), _per_sample(s, x)
    dt = s - t
    sigma_t = flow_grpo_sigma(t, s, noise_level)
    mean = x + (v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = (sigma_t * torch.sqrt(-dt)).expand(x.shape[0], *([1] * (x.dim() - 1)))  # (B, 1, ...)
    return _gaussian_step(mean, std, x_t, prev_sample, noise)


def ddim_sigma(t, s, eta):
    """sigma = eta s sqrt(1 - t); raises if it reaches s, where the mean's sqrt(s^2 - sigma^2) would vanish."""
    sigma = eta * s * torch.sqrt(1 - t)
    bad = (sigma >= s) & (s > 0)
    if bad.any():
        largest = 1 / math.sqrt(1 - float(t[bad].max()))
        raise ValueError(f"eta={eta} makes sigma reach s at t={float(t[bad].max()):.4f}: "
                         f"choose eta < {largest:.4f} (eta < 1 is valid at every t)")
    return sigma


def ddim_step(x_t, v, t, s, eta, prev_sample=None, noise=None):
    """The paper's DDIM-inspired SDE step t -> s (§2); eta = 0 is the Euler ODE step."""
    x, v = x_t.double(), v.double()
    t, s = _per_sample(t, x), _per_sample(s, x)
    x0_hat, x1_hat = tweedie(x, v, t)
    sigma = ddim_sigma(t, s, eta)
    # The noise part keeps total variance s^2, the rectified-flow level at s: s^2 - sigma^2 from x1_hat, sigma^2 fresh.
    mean = (1 - s) * x0_hat + torch.sqrt(s**2 - sigma**2) * x1_hat
    std = sigma.expand(x.shape[0], *([1] * (x.dim() - 1)))
    return _gaussian_step(mean, std, x_t, prev_sample, noise)


@dataclass
class Policy:
    """The sampler as a Gaussian policy pi(x_s | x_t, c) = N(mean, std^2 I) over the schedule `levels` (§2)."""
    levels: torch.Tensor  # (T+1,) t_0 = 1 > ... > t_T = 0
    step_fn: object  # ddim_step or flow_grpo_step, its noise scale bound
    stds: torch.Tensor  # (T,) the std of each step k (state k -> k+1)
    guidance: float  # the CFG scale of v_theta, in sampling, training and x0_est alike
    trained: list  # the steps in the loss: random ones, of std not tiny (choices 1 and 2)

    def step(self, k, x_t, v, prev_sample=None, noise=None):
        return self.step_fn(x_t, v, self.levels[k], self.levels[k + 1], prev_sample=prev_sample, noise=noise)


def policy(sampler, levels, noise, guidance, std_floor=0.0):
    """The policy of `sampler` ("ddim" with eta = noise, or "flow_grpo" with a = noise) on `levels`. A step of std 0
    has no log-probability (choice 1); one of std below std_floor x the largest is left out too (choice 2)."""
    t, s = levels[:-1].double(), levels[1:].double()
    if sampler == "ddim":
        step_fn, stds = partial(ddim_step, eta=noise), ddim_sigma(t, s, noise)
    else:
        step_fn, stds = partial(flow_grpo_step, noise_level=noise), flow_grpo_sigma(t, s, noise) * torch.sqrt(t - s)
    stds = stds.float()
    trained = [k for k in range(len(stds)) if stds[k] > 0 and stds[k] >= std_floor * stds.max()]
    return Policy(levels, step_fn, stds, guidance, trained)


SAMPLERS = ("ddim", "flow_grpo")


@torch.no_grad()
def rollout(velocity_fn, x1, policy, noise):
    """Sample whole trajectories from x1 = x_T down the policy's schedule.

    velocity_fn(x, t) -> v_theta(x_t, t, c); noise (B, T, ...) is the standard normal noise of every step, drawn
    by the caller (choice 7), or None for a policy of std 0 (the ODE). Returns states (B, T+1, ...) in sampling
    order (states[:, 0] = x1, states[:, T] = the final sample), and per transition k (state k -> k+1): log_probs
    (B, T) and velocities (B, T, ...), which x0_est reuses (choice 4). Re-scoring transition k needs only
    states[:, k], states[:, k+1] and the policy.
    """
    x, B = x1, x1.shape[0]
    states, log_probs, velocities = [x1], [], []
    for k in range(len(policy.levels) - 1):
        v = velocity_fn(x, policy.levels[k].expand(B).to(x.device))
        x, log_prob, _, _ = policy.step(k, x, v, noise=None if noise is None else noise[:, k])
        states.append(x)
        log_probs.append(log_prob)
        velocities.append(v)
    return dict(states=torch.stack(states, 1), log_probs=torch.stack(log_probs, 1),
                velocities=torch.stack(velocities, 1))


@torch.no_grad()
def ode_x0(velocity_fn, x_t, t, substeps, v=None):
    """x0_est (§3): `substeps` Euler ODE steps from each sample's own time t (B,) down to 0.

    substeps = 1 is Tweedie's x0_hat. Samples at different times share every forward pass, so all states of all
    trajectories are estimated together: one batched call of velocity_fn per substep. `v`, if given, is the
    velocity at (x_t, t) already computed by the rollout (choice 4).
    """
    x, t0 = x_t, t.to(x_t.device, torch.float32)
    for j in range(substeps):
        t, t_next = t0 * (1 - j / substeps), t0 * (1 - (j + 1) / substeps)  # linear from t0 to 0, per sample
        u = v if (j == 0 and v is not None) else velocity_fn(x, t)
        x = x + _per_sample(t_next - t, x).to(x.dtype) * u
    return x

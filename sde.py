"""Rectified-flow sampling as a Gaussian policy: the schedule, Tweedie estimates, two SDE samplers.

Implements METHOD.md §1-3 (paper: Stepwise-Flow-GRPO, arXiv:2603.28718; baseline Flow-GRPO, arXiv:2505.05470).
Time runs from t = 1 (noise x1) to t = 0 (image x0); x_t = (1 - t) x0 + t x1 and the model predicts v ~ x1 - x0.

    tweedie           x0_hat = x_t - t v,  x1_hat = x_t + (1 - t) v                      (§1)
    flow_grpo_step    Flow-GRPO's SDE: sigma_t = a sqrt(t / (1 - t)), std = sigma_t sqrt(-dt)  (§2)
    ddim_step         DDIM-inspired SDE: sigma = eta s sqrt(1 - t),
                      mean = (1 - s) x0_hat + sqrt(s^2 - sigma^2) x1_hat, std = sigma      (§2)
    ode_x0            x0_est: T' Euler substeps from t down to 0, scored for intermediate rewards (§3)

Notation: x_t -> x_t, prev_sample -> x_s (s < t is the next, less noisy level), v -> v_theta, eta -> η,
noise_level -> a, B batch, T sampling steps. A step returns (prev_sample, log_prob, mean, std); log_prob is the
Gaussian log-density AVERAGED over the non-batch elements (Flow-GRPO's convention, hence its tiny clip range).

Choices (METHOD.md CHOICE):
1. A step whose std is 0 (the DDIM-inspired SDE leaving t = 1, and arriving at s = 0) is deterministic: it has no
   log-probability. Its log_prob is returned as 0 and its std as 0, and the training loop leaves it out of the loss.
2. ode_x0 spaces its T' substeps linearly in t, and may reuse the rollout's velocity at x_t for its first substep:
   it is the same network, weights and guidance, so this saves one forward per state at no change in the result.
"""
import math

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
    """Posterior-mean estimates of the image and the noise from one velocity (METHOD §1)."""
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


def flow_grpo_step(x_t, v, t, s, noise_level, prev_sample=None, noise=None):
    """Flow-GRPO's SDE step t -> s (METHOD §2); noise_level = a (0.7 in Flow-GRPO)."""
    # float64: bf16 overflows in sigma_t^2 / (2t) near t = 1, and the log-ratio of two float32 log-probs is noisy.
    x, v = x_t.double(), v.double()
    t, s = _per_sample(t, x), _per_sample(s, x)
    dt = s - t
    # sigma_t blows up at t = 1; Flow-GRPO uses the next level s_1 there instead (METHOD §2).
    sigma_t = noise_level * torch.sqrt(t / (1 - torch.where(t == 1, s, t)))
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
    """The paper's DDIM-inspired SDE step t -> s (METHOD §2); eta = 0 is the Euler ODE step."""
    x, v = x_t.double(), v.double()
    t, s = _per_sample(t, x), _per_sample(s, x)
    x0_hat, x1_hat = tweedie(x, v, t)
    sigma = ddim_sigma(t, s, eta)
    # The noise part keeps total variance s^2 (the rectified-flow level at s): s^2 - sigma^2 from x1_hat, sigma^2
    # fresh.
    mean = (1 - s) * x0_hat + torch.sqrt(s**2 - sigma**2) * x1_hat
    std = sigma.expand(x.shape[0], *([1] * (x.dim() - 1)))
    return _gaussian_step(mean, std, x_t, prev_sample, noise)


SAMPLERS = {"ddim": ddim_step, "flow_grpo": flow_grpo_step}


@torch.no_grad()
def rollout(velocity_fn, x1, sigmas, step_fn, noise):
    """Sample whole trajectories from x1 down the schedule `sigmas` with the stochastic step `step_fn`.

    step_fn(x_t, v, t, s, prev_sample=None, noise=None) is ddim_step or flow_grpo_step with its noise bound; noise
    (B, T, ...) is the standard normal noise of every step, drawn by the caller (worlds.group_noise says why).
    Returns states (B, T+1, ...) in sampling order (states[:, 0] = x1, states[:, T] = the final sample), and per
    transition k (state k -> k+1): log_probs (B, T), stds (B, T), and velocities (B, T, ...), which ode_x0 reuses.
    Re-scoring transition k needs only states[:, k], states[:, k+1], sigmas[k] and sigmas[k+1].
    """
    x, B = x1, x1.shape[0]
    states, log_probs, stds, velocities = [x1], [], [], []
    for k in range(len(sigmas) - 1):
        t = sigmas[k].expand(B).to(x.device)
        v = velocity_fn(x, t)
        x, log_prob, _, std = step_fn(x, v, sigmas[k], sigmas[k + 1], noise=None if noise is None else noise[:, k])
        states.append(x)
        log_probs.append(log_prob)
        stds.append(std)
        velocities.append(v)
    return dict(states=torch.stack(states, 1), log_probs=torch.stack(log_probs, 1),
                stds=torch.stack(stds, 1), velocities=torch.stack(velocities, 1))


@torch.no_grad()
def ode_x0(velocity_fn, x_t, t, substeps, v=None):
    """x0_est (METHOD §3): `substeps` Euler ODE steps from each sample's own time t (B,) down to 0.

    substeps = 1 is Tweedie's x0_hat. Samples at different times share every forward pass, so all states of all
    trajectories are estimated together: one batched call of velocity_fn per substep. `v`, if given, is the
    velocity at (x_t, t) already computed by the rollout (choice 2).
    """
    x, t0 = x_t, t.to(x_t.device, torch.float32)
    for j in range(substeps):
        t, t_next = t0 * (1 - j / substeps), t0 * (1 - (j + 1) / substeps)  # linear from t0 to 0, per sample
        u = v if (j == 0 and v is not None) else velocity_fn(x, t)
        x = x + _per_sample(t_next - t, x).to(x.dtype) * u
    return x

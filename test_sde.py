"""Tests of sde.py: the schedule, Tweedie's estimates, both SDE samplers as Gaussian policies, rollouts, x0_est.

A Gaussian data distribution x0 ~ N(mu, s0^2 I) gives everything in closed form: x_t ~ N((1-t) mu, var_t I) with
var_t = (1-t)^2 s0^2 + t^2, E[x0 | x_t] = mu + (1-t) s0^2 / var_t (x_t - (1-t) mu),
E[x1 | x_t] = t / var_t (x_t - (1-t) mu),
and the exact velocity is E[x1 - x0 | x_t]. s0 = 0 is point-mass data, where Tweedie's x0_hat is exact.
"""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sde
from conftest import relative_error


class GaussianFlow:
    """Rectified flow of x0 ~ N(mu, s0^2 I) to x1 ~ N(0, I), with its exact posterior means."""

    def __init__(self, mu=0.7, s0=0.5):
        self.mu, self.s0 = mu, s0

    def _t(self, t, x):
        return torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def posterior(self, x, t):
        t = self._t(t, x)
        var_t = (1 - t) ** 2 * self.s0**2 + t**2
        r = x - (1 - t) * self.mu
        return self.mu + (1 - t) * self.s0**2 / var_t * r, t / var_t * r  # E[x0 | x_t], E[x1 | x_t]

    def velocity(self, x, t):
        x0, x1 = self.posterior(x, t)
        return x1 - x0

    def marginal(self, n, t, dim=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        var_t = (1 - t) ** 2 * self.s0**2 + t**2
        return (1 - t) * self.mu + math.sqrt(var_t) * torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_sigmas_equal_diffusers_flow_match_euler_schedule():
    """sigmas(T, shift) is exactly the schedule FlowMatchEulerDiscreteScheduler builds for SD3."""
    for T, shift in [(1, 3.0), (10, 3.0), (40, 3.0), (7, 1.0)]:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(T)
        assert torch.allclose(sde.sigmas(T, shift), ref.sigmas, atol=1e-6), f"schedule differs at T={T}, shift={shift}"
    assert torch.allclose(sde.sigmas(10)[[1, 9]], torch.tensor([0.9601, 0.0089]), atol=1e-4)


def test_tweedie_estimates_are_the_exact_posterior_means():
    """x0_hat = x_t - t v and x1_hat = x_t + (1 - t) v equal E[x0 | x_t] and E[x1 | x_t] for Gaussian data."""
    flow = GaussianFlow()
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    x0_hat, x1_hat = sde.tweedie(x, flow.velocity(x, t), t)
    e0, e1 = flow.posterior(x, t)
    assert torch.allclose(x0_hat, e0) and torch.allclose(x1_hat, e1), "Tweedie formula has a wrong sign or factor"


@pytest.mark.parametrize("step,noise", [(sde.ddim_step, 0.0), (sde.flow_grpo_step, 0.0)])
def test_both_samplers_with_zero_noise_are_the_euler_step(step, noise):
    """eta = 0 (DDIM-inspired) and a = 0 (Flow-GRPO) give exactly x_s = x_t + (s - t) v, deterministically."""
    x, v = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    for t, s in [(1.0, 0.96), (0.6, 0.45), (0.0089, 0.0)]:
        x_s, log_prob, mean, std = step(x, v, t, s, noise)
        assert relative_error(x_s, x + (s - t) * v) < 1e-6, f"{step.__name__} is not Euler at t={t}"
        assert (std == 0).all() and (log_prob == 0).all(), "a deterministic step must be marked with std 0"


def test_flow_grpo_sde_with_exact_velocity_ends_at_the_data_distribution():
    """Flow-GRPO's SDE over a fine schedule carries x_t's exact marginal to the data's mean and variance."""
    flow, n = GaussianFlow(mu=0.7, s0=0.5), 40_000
    ts = torch.linspace(0.98, 0.0, 400, dtype=torch.float64)
    x, g = flow.marginal(n, float(ts[0])), torch.Generator().manual_seed(1)
    for t, s in zip(ts[:-1], ts[1:]):
        x = sde.flow_grpo_step(x, flow.velocity(x, t), t, s, 0.7, noise=torch.randn(x.shape, generator=g))[0]
    # Standard errors of the sample mean and variance: s0 / sqrt(n) and s0^2 sqrt(2 / n); allow 5 of each.
    assert abs(x.mean() - 0.7) < 5 * 0.5 / math.sqrt(n), f"mean {x.mean():.4f}: SDE drift is biased"
    assert abs(x.var() - 0.25) < 5 * 0.25 * math.sqrt(2 / n) + 0.003, f"variance {x.var():.4f}, want 0.25"


@pytest.mark.parametrize("eta", [0.0, 0.5, 0.9])
def test_ddim_sde_lands_exactly_on_the_marginal_for_point_mass_data(eta):
    """With x0 known (s0 = 0), each DDIM-SDE step maps N((1-t) mu, t^2) exactly onto N((1-s) mu, s^2)."""
    flow, n = GaussianFlow(mu=0.7, s0=0.0), 40_000
    levels = sde.sigmas(10).double()
    x, g = flow.marginal(n, 1.0), torch.Generator().manual_seed(2)
    for t, s in zip(levels[:-1], levels[1:]):
        x = sde.ddim_step(x, flow.velocity(x, t), t, s, eta, noise=torch.randn(x.shape, generator=g))[0]
        z = (x - (1 - s) * 0.7) / max(float(s), 1e-12)  # should be exactly N(0, 1)
        if s > 0:
            assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n), \
                f"eta={eta}: step to s={float(s):.3f} left the marginal (mean {z.mean():.4f}, var {z.var():.4f})"
    assert torch.allclose(x, torch.full_like(x, 0.7)), "the last step must land on x0 itself"


def test_ddim_sde_variance_shortfall_on_spread_data_grows_with_eta():
    """With Gaussian data (std 0.5), the final std falls further below 0.5 as eta grows (METHOD §2)."""
    flow, n = GaussianFlow(mu=0.0, s0=0.5), 50_000
    ts = torch.linspace(0.98, 0.0, 99, dtype=torch.float64)
    finals = {}
    for eta in (0.0, 0.3, 0.7):
        x, g = flow.marginal(n, 0.98, seed=3), torch.Generator().manual_seed(4)  # common random numbers
        for t, s in zip(ts[:-1], ts[1:]):
            x = sde.ddim_step(x, flow.velocity(x, t), t, s, eta, noise=torch.randn(x.shape, generator=g))[0]
        finals[eta] = float(x.std())
    assert abs(finals[0.0] - 0.5) < 0.012, f"the ODE (eta 0) should nearly reach std 0.5, got {finals[0.0]:.4f}"
    assert finals[0.0] > finals[0.3] > finals[0.7], f"shortfall should grow with eta: {finals}"
    assert finals[0.7] < 0.48, f"eta 0.7 should fall clearly short of 0.5 (METHOD measures 0.462): {finals}"


@pytest.mark.parametrize("step,noise,t,s", [(sde.ddim_step, 0.7, 0.6, 0.45), (sde.flow_grpo_step, 0.7, 1.0, 0.96),
                                            (sde.flow_grpo_step, 0.7, 0.3, 0.2)])
def test_log_prob_is_the_normal_density_averaged_and_rescoring_is_identical(step, noise, t, s):
    """log_prob = mean of Normal(mean, std).log_prob(x_s) over elements, and re-scoring the sample gives it back."""
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_s, log_prob, mean, std = step(x, v, t, s, noise, noise=torch.randn(x.shape))
    ref = torch.distributions.Normal(mean.double(), std.double().reshape(-1, 1, 1, 1)).log_prob(x_s.double())
    assert torch.allclose(log_prob.double(), ref.mean(dim=(1, 2, 3)), atol=1e-5), "log-density formula is off"
    again = step(x, v, t, s, noise, prev_sample=x_s)[1]
    assert torch.equal(again, log_prob), "re-scoring a stored transition must reproduce log_prob bit for bit"
    assert log_prob.shape == (4,) and log_prob.dtype == torch.float32


def test_steps_run_in_float32_or_wider_for_bf16_inputs():
    """A bf16 state still gets a finite log-probability: the arithmetic runs in float64 inside."""
    x, v = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    x_s, log_prob, _, _ = sde.flow_grpo_step(x, v, 1.0, 0.96, 0.7, noise=torch.randn(x.shape))
    assert x_s.dtype == torch.bfloat16 and log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()


def test_ddim_step_rejects_an_eta_that_makes_sigma_reach_s():
    """eta >= 1/sqrt(1 - t) would make sigma >= s: the error names eta and the largest valid value."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"eta=1.5 .* eta < 1\.0260"):
        sde.ddim_step(x, x, 0.05, 0.04, 1.5)
    sde.ddim_step(x, x, 0.05, 0.04, 0.99, noise=torch.randn_like(x))  # every eta < 1 is valid


def test_a_random_step_without_noise_is_refused():
    """Only a step of std 0 may run without noise: a forgotten noise must not silently make the sampler the ODE."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="needs its noise"):
        sde.ddim_step(x, x, 0.5, 0.4, 0.5)
    assert torch.equal(sde.ddim_step(x, x, 0.5, 0.4, 0.0)[0], sde.ddim_step(x, x, 0.5, 0.4, 0.0, noise=x)[0])


def test_steps_accept_per_sample_times():
    """t and s as (B,) tensors give row by row what the float version gives."""
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.4, 0.1])
    batched = sde.ddim_step(x, v, t, s, 0.5, prev_sample=x)[1]
    rows = torch.cat([sde.ddim_step(x[i:i + 1], v[i:i + 1], float(t[i]), float(s[i]), 0.5,
                                    prev_sample=x[i:i + 1])[1] for i in range(3)])
    assert torch.allclose(batched, rows), "per-sample times are mixed up across the batch"


def test_rollout_shapes_rescoring_and_same_noise_same_result():
    """rollout returns (B, T+1, ...) states; re-scoring each transition gives ratio exactly 1; noise reproduces."""
    flow = GaussianFlow()
    policy = sde.policy("flow_grpo", sde.sigmas(6), 0.7, guidance=1.0)
    x1 = torch.randn(4, 2, 3, 3)
    noise = torch.randn(4, 6, 2, 3, 3)
    out = sde.rollout(flow.velocity, x1, policy, noise)
    assert out["states"].shape == (4, 7, 2, 3, 3) and out["log_probs"].shape == (4, 6)
    assert torch.equal(out["states"][:, 0], x1)
    for k in range(6):
        lp = policy.step(k, out["states"][:, k], out["velocities"][:, k], prev_sample=out["states"][:, k + 1])[1]
        assert torch.equal(lp, out["log_probs"][:, k]), f"ratio at step {k} is not exactly 1 on-policy"
    again = sde.rollout(flow.velocity, x1, policy, noise.clone())
    assert torch.equal(again["states"], out["states"]), "the same noise must give the same trajectories"


def test_ode_x0_with_one_substep_is_tweedie_and_with_many_is_the_exact_flow_map():
    """T' = 1 gives x0_hat; many substeps give the Gaussian flow's exact ODE endpoint; mixed times batch together."""
    flow = GaussianFlow(mu=0.7, s0=0.5)
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.2])
    assert torch.allclose(sde.ode_x0(flow.velocity, x, t, 1), sde.tweedie(x, flow.velocity(x, t), t)[0])
    # The probability-flow ODE of a Gaussian is the affine map x0 = mu + s0 / sqrt(var_t) (x_t - (1-t) mu).
    td = t.double()[:, None]
    exact = 0.7 + 0.5 / torch.sqrt((1 - td) ** 2 * 0.25 + td**2) * (x - (1 - td) * 0.7)
    assert torch.allclose(sde.ode_x0(flow.velocity, x, t, 2000), exact, atol=2e-3), "substeps do not follow the ODE"
    separate = torch.cat([sde.ode_x0(flow.velocity, x[i:i + 1], t[i:i + 1], 5) for i in range(3)])
    assert torch.allclose(sde.ode_x0(flow.velocity, x, t, 5), separate), "states at different times interfere"
    v = flow.velocity(x, t)
    assert torch.equal(sde.ode_x0(flow.velocity, x, t, 5, v=v), sde.ode_x0(flow.velocity, x, t, 5))


@pytest.mark.parametrize("sampler, noise, left_out", [("ddim", 0.9, [0, 8, 9]), ("flow_grpo", 0.7, [9])])
def test_policy_trains_the_random_steps_whose_std_is_not_tiny(sampler, noise, left_out):
    """Std-0 steps (choice 1) and the step of tiny std, into or out of s = 0.009 (choice 2), are left out of the
    loss; std_floor 0 keeps the latter."""
    levels = sde.sigmas(10)
    trained = sde.policy(sampler, levels, noise, 1.0, std_floor=0.1).trained
    assert trained == [k for k in range(10) if k not in left_out]
    deterministic = [0, 9] if sampler == "ddim" else []
    everything = sde.policy(sampler, levels, noise, 1.0, std_floor=0.0).trained
    assert everything == [k for k in range(10) if k not in deterministic]


@pytest.mark.parametrize("sampler, noise", [("ddim", 0.9), ("flow_grpo", 0.7)])
def test_policy_stds_are_the_std_each_step_samples_with(sampler, noise):
    """policy.stds[k], from which the trained steps are chosen, is the std the policy's step k returns."""
    policy = sde.policy(sampler, sde.sigmas(10), noise, 1.0)
    x = torch.randn(3, 2, 4)
    for k in range(10):
        std = policy.step(k, x, torch.randn_like(x), noise=torch.randn_like(x))[3]
        assert torch.equal(std, policy.stds[k].expand(3)), f"step {k}: the policy's std is not its step's"

"""Tests for stepgrpo: the math on toy flows with closed-form answers, then the worlds, then end-to-end runs.

A Gaussian data distribution x0 ~ N(mu, s0^2 I) gives everything in closed form: x_t ~ N((1-t) mu, var_t I) with
var_t = (1-t)^2 s0^2 + t^2, E[x0 | x_t] = mu + (1-t) s0^2 / var_t (x_t - (1-t) mu), E[x1 | x_t] = t / var_t (x_t - (1-t) mu),
and the exact velocity is E[x1 - x0 | x_t]. s0 = 0 is point-mass data, where Tweedie's x0_hat is exact.
Run: python -m pytest -q   (slow end-to-end runs: python -m pytest -q -m slow)
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be downloaded here; fail at once instead of retrying

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sde
import stepgrpo


# ----------------------------------------------------------------------------------------------------------- sde.py
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
        assert torch.allclose(x_s, x + (s - t) * v, atol=1e-6), f"{step.__name__} is not Euler at t={t}"
        assert (std == 0).all() and (log_prob == 0).all(), "a deterministic step must be marked with std 0"


def test_flow_grpo_sde_with_exact_velocity_ends_at_the_data_distribution():
    """Flow-GRPO's SDE over a fine schedule carries x_t's exact marginal to the data's mean and variance."""
    flow, n = GaussianFlow(mu=0.7, s0=0.5), 40_000
    ts = torch.linspace(0.98, 0.0, 400, dtype=torch.float64)
    x, g = flow.marginal(n, float(ts[0])), torch.Generator().manual_seed(1)
    for t, s in zip(ts[:-1], ts[1:]):
        x = sde.flow_grpo_step(x, flow.velocity(x, t), t, s, 0.7, generator=g)[0]
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
        x = sde.ddim_step(x, flow.velocity(x, t), t, s, eta, generator=g)[0]
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
            x = sde.ddim_step(x, flow.velocity(x, t), t, s, eta, generator=g)[0]
        finals[eta] = float(x.std())
    assert abs(finals[0.0] - 0.5) < 0.012, f"the ODE (eta 0) should nearly reach std 0.5, got {finals[0.0]:.4f}"
    assert finals[0.0] > finals[0.3] > finals[0.7], f"shortfall should grow with eta: {finals}"
    assert finals[0.7] < 0.48, f"eta 0.7 should fall clearly short of 0.5 (METHOD measures 0.462): {finals}"


@pytest.mark.parametrize("step,noise,t,s", [(sde.ddim_step, 0.7, 0.6, 0.45), (sde.flow_grpo_step, 0.7, 1.0, 0.96),
                                            (sde.flow_grpo_step, 0.7, 0.3, 0.2)])
def test_log_prob_is_the_normal_density_averaged_and_rescoring_is_identical(step, noise, t, s):
    """log_prob = mean of Normal(mean, std).log_prob(x_s) over elements, and re-scoring the sample gives it back."""
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_s, log_prob, mean, std = step(x, v, t, s, noise, generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Normal(mean.double(), std.double().reshape(-1, 1, 1, 1)).log_prob(x_s.double())
    assert torch.allclose(log_prob.double(), ref.mean(dim=(1, 2, 3)), atol=1e-5), "log-density formula is off"
    again = step(x, v, t, s, noise, prev_sample=x_s)[1]
    assert torch.equal(again, log_prob), "re-scoring a stored transition must reproduce log_prob bit for bit"
    assert log_prob.shape == (4,) and log_prob.dtype == torch.float32


def test_steps_run_in_float32_or_wider_for_bf16_inputs():
    """A bf16 state still gets a finite log-probability: the arithmetic runs in float64 inside."""
    x, v = torch.randn(2, 4, 8, 8).bfloat16(), torch.randn(2, 4, 8, 8).bfloat16()
    x_s, log_prob, _, _ = sde.flow_grpo_step(x, v, 1.0, 0.96, 0.7, generator=torch.Generator().manual_seed(0))
    assert x_s.dtype == torch.bfloat16 and log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()


def test_ddim_step_rejects_an_eta_that_makes_sigma_reach_s():
    """eta >= 1/sqrt(1 - t) would make sigma >= s: the error names eta and the largest valid value."""
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"eta=1.5 .* eta < 1\.0260"):
        sde.ddim_step(x, x, 0.05, 0.04, 1.5)
    sde.ddim_step(x, x, 0.05, 0.04, 0.99)  # every eta < 1 is valid


def test_steps_accept_per_sample_times():
    """t and s as (B,) tensors give row by row what the float version gives."""
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.4, 0.1])
    batched = sde.ddim_step(x, v, t, s, 0.5, prev_sample=x)[1]
    rows = torch.cat([sde.ddim_step(x[i:i + 1], v[i:i + 1], float(t[i]), float(s[i]), 0.5,
                                    prev_sample=x[i:i + 1])[1] for i in range(3)])
    assert torch.allclose(batched, rows), "per-sample times are mixed up across the batch"


def test_rollout_shapes_rescoring_and_same_seed_same_result():
    """rollout returns (B, T+1, ...) states; re-scoring each transition gives ratio exactly 1; seeds reproduce."""
    flow, levels = GaussianFlow(), sde.sigmas(6)
    x1 = torch.randn(4, 2, 3, 3)
    step = lambda *a, **k: sde.flow_grpo_step(*a, noise_level=0.7, **k)
    out = sde.rollout(flow.velocity, x1, levels, step, torch.Generator().manual_seed(5))
    assert out["states"].shape == (4, 7, 2, 3, 3) and out["log_probs"].shape == (4, 6)
    assert torch.equal(out["states"][:, 0], x1)
    for k in range(6):
        lp = step(out["states"][:, k], out["velocities"][:, k], levels[k], levels[k + 1],
                  prev_sample=out["states"][:, k + 1])[1]
        assert torch.equal(lp, out["log_probs"][:, k]), f"ratio at step {k} is not exactly 1 on-policy"
    again = sde.rollout(flow.velocity, x1, levels, step, torch.Generator().manual_seed(5))
    assert torch.equal(again["states"], out["states"]), "same seed must give the same trajectories"


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


# ------------------------------------------------------------------------------------------------------ stepgrpo.py
def test_gains_telescope_to_final_minus_initial_reward():
    """sum_k g_k = r_T - r_0, with g_k = r_{k+1} - r_k; e.g. r = [0, .2, .5] gives gains [.2, .3]."""
    assert torch.allclose(stepgrpo.gains(torch.tensor([[0.0, 0.2, 0.5]])), torch.tensor([[0.2, 0.3]]))
    r = torch.rand(6, 11)
    assert torch.allclose(stepgrpo.gains(r).sum(1), r[:, -1] - r[:, 0])


def test_joint_normalisation_is_standard_per_group_and_ignores_other_groups():
    """Within each group the N*T advantages have mean 0 and std 1; other groups and shifts change nothing."""
    r, groups = torch.rand(8, 6, dtype=torch.float64), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = stepgrpo.stepwise_advantages(r, groups)
    assert adv.shape == (8, 5)
    for g in (0, 1):
        a = adv[groups == g]
        assert abs(a.mean()) < 1e-9 and abs(a.std(unbiased=False) - 1) < 1e-3, "not jointly standardised"
    r2 = r.clone()
    r2[4:] = torch.rand(4, 6, dtype=torch.float64)
    assert torch.equal(stepgrpo.stepwise_advantages(r2, groups)[:4], adv[:4]), "a group leaks into another"
    assert torch.allclose(stepgrpo.stepwise_advantages(r + 3.0 * (groups[:, None] == 0), groups), adv)


def test_per_step_normalisation_standardises_each_step_separately():
    """per_step=True: each step's gains over the group have mean 0 and std 1."""
    r, groups = torch.rand(6, 4, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 1, 1])
    adv = stepgrpo.stepwise_advantages(r, groups, per_step=True)
    assert torch.allclose(adv[:3].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(adv[:3].std(0, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-3)


def test_flow_grpo_advantages_are_group_relative_and_zero_for_tied_groups():
    """A = (R - group mean) / (group std + eps); a group whose rewards are all equal gets 0."""
    R, groups = torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1])
    assert torch.allclose(stepgrpo.flow_grpo_advantages(R, groups), torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-3)
    # Global std: batch std of [1, 3, 5, 5] is sqrt(2.75); group means 2 and 5.
    want = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / math.sqrt(2.75)
    assert torch.allclose(stepgrpo.flow_grpo_advantages(R, groups, global_std=True), want, atol=1e-3)


def test_grpo_loss_value_and_gradient_at_ratio_one_and_past_the_clip():
    """At ratio 1 the loss is -mean(A) with gradient -A/n; past the clip the clipped side has zero gradient."""
    adv = torch.tensor([1.0, -2.0])
    lp = torch.zeros(2, requires_grad=True)
    loss = stepgrpo.grpo_loss(lp, torch.zeros(2), adv, 0.2)
    loss.backward()
    assert torch.isclose(loss, torch.tensor(0.5)) and torch.allclose(lp.grad, torch.tensor([-0.5, 1.0]))
    # log ratio 0.5 (ratio 1.65 > 1.2): A > 0 is clipped (no gradient); A < 0 keeps the unclipped, larger loss.
    lp = torch.full((2,), 0.5, requires_grad=True)
    loss = stepgrpo.grpo_loss(lp, torch.zeros(2), adv, 0.2)
    loss.backward()
    r = math.exp(0.5)
    assert torch.isclose(loss, torch.tensor((-1.2 + 2 * r) / 2)), "clipped objective has the wrong value"
    assert torch.allclose(lp.grad, torch.tensor([0.0, r])), "the clip must stop the gradient only where it binds"


def test_kl_penalty_is_the_squared_mean_gap_over_twice_the_variance():
    """Gaussians of std 0.5 whose means differ by 1 everywhere: KL = 1 / (2 * 0.25) = 2."""
    mean = torch.zeros(2, 3, 4)
    assert torch.allclose(stepgrpo.kl_penalty(mean, mean + 1, torch.tensor([0.5, 0.5])), torch.tensor([2.0, 2.0]))


def test_policy_stats_on_policy_report_ratio_one_and_nothing_clipped():
    """On-policy: approx KL 0, clip fraction 0, mean ratio 1."""
    lp = torch.randn(10)
    assert stepgrpo.policy_stats(lp, lp, 1e-4) == dict(approx_kl=0.0, clip_frac=0.0, ratio=1.0)


# --------------------------------------------------------------------------------------------------------- train.py
import dataclasses
import json
import signal

import rewards
import train


def tiny(tmp_path, **overrides):
    """A toy run small enough for seconds on 2 CPU cores: 2 prompts x 2 trajectories, T = 4, 20 pretraining steps."""
    cfg = train.toy(train.Config())
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "run"), cache_dir=str(tmp_path.parent / "toy_cache"),
                              pretrain_steps=20, steps=2, prompts_per_step=2, group_size=2, num_steps=4,
                              tweedie_substeps=2, eval_steps=2, eval_every=1, micro_batch=2, lr=1e-2)
    return dataclasses.replace(cfg, **overrides)


def lora_state(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["lora"]


@pytest.mark.parametrize("advantage,sampler", [("stepwise", "ddim"), ("flow_grpo", "flow_grpo")])
def test_a_tiny_training_run_writes_its_outputs_and_changes_only_the_lora(tmp_path, advantage, sampler):
    """Both methods run end to end: finite losses, first ratio 1, every output file, LoRA changed, base untouched."""
    import toy
    base = toy.ToyWorld("cpu", tmp_path.parent / "toy_cache", pretrain_steps=20).transformer.state_dict()
    cfg = tiny(tmp_path, advantage=advantage, sampler=sampler)
    result = train.main(cfg)
    for name in ("metrics.jsonl", "config.json", "ckpt.pt", "lora/pytorch_lora_weights.safetensors",
                 "reward_curve.png", "samples_start.png", "samples_end.png", "fig1_trajectories.png"):
        assert os.path.isfile(os.path.join(cfg.out, name)), f"{name} was not written"
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [r["it"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows[:2])
    assert all(r["ratio_first"] == 1.0 for r in rows[:2]), "re-scoring before the first update must give ratio 1"
    assert len(result["eval_rewards"]) == 3
    init = toy.ToyWorld("cpu", tmp_path.parent / "toy_cache", pretrain_steps=20)  # fresh: the same base weights
    torch.manual_seed(cfg.seed)
    from peft import LoraConfig, get_peft_model_state_dict
    init.transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    before, after = get_peft_model_state_dict(init.transformer), lora_state(cfg.out)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k].float(), after[k])]
    assert not unchanged, f"LoRA parameters never updated: {unchanged[:3]}"
    assert all(torch.equal(base[k], v) for k, v in toy.ToyWorld("cpu", tmp_path.parent / "toy_cache",
                                                                pretrain_steps=20).transformer.state_dict().items())


def test_a_resumed_run_ends_bit_identical_to_one_that_never_stopped(tmp_path):
    """2 iterations + --resume to 4 gives exactly the LoRA and rewards of 4 iterations straight (CPU)."""
    straight = tiny(tmp_path / "a", steps=4, eval_every=10)
    train.main(straight)
    split = tiny(tmp_path / "b", steps=2, eval_every=10)
    train.main(split)
    train.main(dataclasses.replace(split, steps=4, resume=True))
    a, b = lora_state(straight.out), lora_state(split.out)
    assert all(torch.equal(a[k], b[k]) for k in a), "resume does not restore the RNG, optimizer or weights exactly"
    reward = lambda cfg: [json.loads(l).get("reward") for l in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert reward(straight) == reward(split)


def test_ctrl_c_finishes_the_iteration_and_writes_a_checkpoint(tmp_path, monkeypatch):
    """A SIGINT mid-run stops after the current iteration with a checkpoint that --resume continues."""
    def interrupting(device):
        score, calls = rewards.build("toy_geneval", device), []
        def fn(images, prompts):
            calls.append(1)
            if len(calls) == 2:  # the first iteration's rewards, after its evaluation: as if the user hit Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
            return score(images, prompts)
        return fn
    monkeypatch.setitem(rewards.REWARDS, "interrupting", interrupting)
    cfg = tiny(tmp_path, reward="interrupting", steps=5, eval_every=10)
    train.main(cfg)
    assert torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)["it"] == 1
    assert not os.path.exists(os.path.join(cfg.out, "samples_end.png")), "an interrupted run must not claim to end"


def test_non_finite_losses_skip_updates_then_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    """A NaN reward makes NaN advantages: updates are skipped, and 3 in a row stop the run with a clear error."""
    monkeypatch.setitem(rewards.REWARDS, "nan", lambda device: lambda images, prompts: torch.full((len(prompts),), math.nan))
    cfg = tiny(tmp_path, reward="nan", steps=5, eval_every=10, micro_batch=4)
    with pytest.raises(RuntimeError, match="non-finite losses in a row"):
        train.main(cfg)
    assert torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)["it"] == 3


@pytest.mark.parametrize("flag,value,match", [
    ("group_size", 1, "--group-size=1 is invalid: must be >= 2"),
    ("eta", 1.5, "--eta: eta=1.5 makes sigma reach s"),
    ("reward", "hps", "--reward='hps' is invalid: must be one of"),
    ("lr", 0.0, "--lr=0.0 is invalid: must be > 0"),
    ("prompts", "/no/such/file.txt", "--prompts='/no/such/file.txt' is invalid"),
    ("sampler", "euler", "--sampler='euler' is invalid"),
    ("advantage", "ppo", "--advantage='ppo' is invalid"),
    ("resume", True, "--resume=True is invalid: must be a run in --out"),
    ("tweedie_substeps", 0, "--tweedie-substeps=0 is invalid"),
])
def test_each_bad_flag_is_rejected_before_any_work_with_its_name(tmp_path, flag, value, match):
    """check(cfg) names the flag and its valid range; nothing is built or written first."""
    cfg = dataclasses.replace(tiny(tmp_path), **{flag: value})
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        train.main(cfg)
    assert not os.path.exists(cfg.out), "work started before the flags were checked"


def test_flags_override_the_preset_and_unknown_flags_are_named(capsys):
    """--group-size 4 overrides the toy preset; --group-sise is an argparse error naming it."""
    cfg = train.parse_args(["--group-size", "4", "--shared-noise", "false"])
    assert cfg.group_size == 4 and cfg.shared_noise is False and cfg.lora_rank == train.toy(train.Config()).lora_rank
    with pytest.raises(SystemExit):
        train.parse_args(["--group-sise", "4"])
    assert "--group-sise" in capsys.readouterr().err
    assert train.parse_args(["--model", "some/sd3"]).reward == "pickscore", "an SD3 model takes the sd35 preset"

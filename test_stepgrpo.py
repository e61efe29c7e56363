"""Tests of stepgrpo.py: the intermediate rewards, credit assignment and the clipped objective with its KL.

Exact values on tiny hand-built tensors (the arithmetic in a comment), the properties METHOD.md §3-5 state (the gains
telescope, the normalisation is per group and joint), and Flow-GRPO's own formulas where the project takes them.
"""
import math

import pytest
import torch

import config
import sde
import stepgrpo
from conftest import relative_error


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
    r = torch.rand(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = stepgrpo.stepwise_advantages(r, groups, per_step=True)
    assert torch.allclose(adv[:3].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9)
    s = stepgrpo.gains(r)[:3].std(0, unbiased=False)  # std 1 up to the eps of the denominator: s / (s + eps)
    assert torch.allclose(adv[:3].std(0, unbiased=False), s / (s + stepgrpo.EPS), atol=1e-9)


def test_flow_grpo_advantages_are_group_relative_and_zero_for_tied_groups():
    """A = (R - group mean) / (group std + eps) of the final reward, the last of each row; a tied group gets 0."""
    R, groups = torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1])
    r = torch.stack([torch.rand(4), R], 1)  # (B, 2): an intermediate reward, which must not count, then the final
    adv = stepgrpo.flow_grpo_advantages(r, groups)
    assert adv.shape == (4, 1), "one advantage a trajectory, the same for every step"
    assert torch.allclose(adv[:, 0], torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-3)
    # Global std: batch std of [1, 3, 5, 5] is sqrt(2.75); group means 2 and 5.
    want = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / math.sqrt(2.75)
    assert torch.allclose(stepgrpo.flow_grpo_advantages(r, groups, global_std=True)[:, 0], want, atol=1e-3)


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


def test_kl_penalty_is_the_squared_mean_gap_over_twice_the_variance_times_the_step_length():
    """Gaussians of std 0.5 whose means differ by 1 everywhere: KL = 1 / (2 * 0.25) = 2; over |dt| = 0.1: 0.2."""
    mean = torch.zeros(2, 3, 4)
    kl = stepgrpo.kl_penalty(mean, mean + 1, torch.tensor([0.5, 0.5]), dt=-0.1)
    assert torch.allclose(kl, torch.tensor([0.2, 0.2])), "the KL must be the per-step Gaussian KL times |dt|"


@pytest.mark.parametrize("t,s", [(1.0, 0.96), (0.6022, 0.4649), (0.278, 0.0089)])
def test_kl_penalty_on_the_flow_grpo_sde_is_flow_grpos_own_kl_term(t, s):
    """Flow-GRPO's KL is |mean - ref_mean|^2 / (2 sigma_t^2), sigma_t = a sqrt(t / (1 - t)) (s at t = 1), no dt:
    kl_penalty of the step's own std and dt must equal it, so that Flow-GRPO's beta values carry over."""
    x, v, v_ref = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    _, _, mean, std = sde.flow_grpo_step(x, v, t, s, 0.7, prev_sample=x)
    ref_mean = sde.flow_grpo_step(x, v_ref, t, s, 0.7, prev_sample=x)[2]
    sigma_t = 0.7 * math.sqrt(t / (1 - (s if t == 1 else t)))  # sd3_sde_with_logprob.py's std_dev_t
    theirs = ((mean.double() - ref_mean.double()) ** 2).mean(dim=(1, 2, 3)) / (2 * sigma_t**2)
    ours = stepgrpo.kl_penalty(mean, ref_mean, std, s - t)
    assert torch.allclose(ours.double(), theirs, rtol=1e-4), "the KL's scale differs from Flow-GRPO's"


def test_global_std_divides_every_group_by_the_batchs_std_for_both_credits():
    """--global-std: group means stay, the std is the whole batch's (of the rewards, or of all the gains)."""
    r = torch.rand(8, 5, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    g = stepgrpo.gains(r)
    means = torch.stack([g[groups == i].mean() for i in groups])[:, None]
    want = (g - means) / (g.std(unbiased=False) + stepgrpo.EPS)
    got = stepgrpo.stepwise_advantages(r, groups, adv_clip=100.0, global_std=True)
    assert torch.allclose(got, want), "the stepwise advantage ignores --global-std"
    assert not torch.allclose(got, stepgrpo.stepwise_advantages(r, groups, adv_clip=100.0)), "global std had no effect"


def test_policy_stats_on_policy_report_ratio_one_and_nothing_clipped():
    """On-policy: approx KL 0, clip fraction 0, mean ratio 1."""
    lp = torch.randn(10)
    assert stepgrpo.policy_stats(lp, lp, 1e-4) == dict(approx_kl=0.0, clip_frac=0.0, ratio=1.0)


@pytest.mark.parametrize("name", ["stepwise", "flow_grpo"])
def test_every_credit_takes_its_options_by_keyword_only(name):
    """The credits share one signature, their options keyword-only: a positional option is a TypeError, never an
    option silently read as another (per_step as global_std)."""
    r, groups = torch.rand(4, 5), torch.tensor([0, 0, 1, 1])
    credit = stepgrpo.CREDITS[name].advantages
    with pytest.raises(TypeError):
        credit(r, groups, True)
    adv = credit(r, groups, per_step=False, global_std=True, adv_clip=1.0)
    assert adv.shape in {(4, 4), (4, 1)} and adv.abs().max() <= 1.0, "advantages must be clipped to adv_clip"


def test_the_stepwise_credit_of_a_whole_trajectory_is_its_final_reward_relative_to_its_group():
    """Summed over steps, the gains are r_T - r_0 and r_0 is the group's (a shared x_T): before normalisation, a
    trajectory's total stepwise credit minus its group's mean is its final reward minus the group's mean."""
    r = torch.rand(6, 5, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    r[:, 0] = torch.where(groups == 0, 0.3, 0.6).double()  # r_0 shared by each group
    total = stepgrpo.gains(r).sum(1)
    final = r[:, -1]
    for g in (0, 1):
        rows = groups == g
        assert torch.allclose(total[rows] - total[rows].mean(), final[rows] - final[rows].mean())


class Flow:
    """A toy world for the estimates: velocity tanh(c x + t), with c the prompt group's number (c = 1, 2, ...)."""

    def __init__(self):
        self.calls = []

    def velocity(self, x, t, cond, guidance):
        self.calls.append(len(x))
        return torch.tanh(x * cond["c"][:, None] + t[:, None])

    def decode(self, x0):
        return x0


def test_a_repeated_state_is_estimated_and_scored_once_with_the_same_result():
    """A group sharing x_T has one x_T, and the DDIM SDE's deterministic first step one x^(1): x0_estimates runs
    the model on each distinct state once (choice 5), and gives what estimating every state would; rewards scores
    each distinct estimate once, and gives what scoring every one would."""
    G, N, T = 2, 3, 4
    policy = sde.policy("ddim", sde.sigmas(T), 0.9, guidance=1.0)
    world = Flow()
    groups = torch.arange(G).repeat_interleave(N)
    cond = {"c": groups.float() + 1}
    x1 = torch.randn(G, 5).repeat_interleave(N, 0)
    out = stepgrpo.sample(world, policy, cond, x1, torch.randn(G * N, T, 5), [slice(0, G * N)])
    batch = stepgrpo.Batch([f"p{g}" for g in groups.tolist()], groups, cond, out["states"], out["log_probs"],
                           out["velocities"], plan=[])
    world.calls.clear()
    x0, source = stepgrpo.x0_estimates(world, batch, policy, 2)
    n = int((source[:, :T] == torch.arange(G * N)[:, None]).sum())
    assert n == G * N * T - 2 * G * (N - 1), f"{n} states estimated: x_T and x^(1) must be estimated once a group"
    assert world.calls == [n], "the substep after the reused velocity runs once, over the distinct states only"
    states, v = out["states"][:, :T].flatten(0, 1), out["velocities"].flatten(0, 1)
    rep = torch.arange(G * N).repeat_interleave(T)
    every = sde.ode_x0(lambda x, t: world.velocity(x, t, {"c": cond["c"][rep]}, 1.0), states,
                       policy.levels[:T].repeat(G * N), 2, v=v)
    assert relative_error(x0[:, :T].flatten(0, 1), every) < 1e-6, "a shared estimate differs from its own"
    scored = []
    reward = lambda images, prompts: scored.append(len(images)) or images.flatten(1).sum(1)
    once, _ = stepgrpo.rewards(world, reward, x0, batch.prompts, source)
    assert scored == [n + G * N], "each distinct estimate and each final image is scored once"
    assert torch.equal(once, stepgrpo.rewards(world, reward, x0, batch.prompts)[0]), "a copied reward differs"


class Shift:
    """A one-parameter policy for the update: velocity x + theta, and an optimizer step of plain SGD."""

    def __init__(self):
        self.theta = torch.nn.Parameter(torch.zeros(3))
        self.transformer = torch.nn.Module()
        self.opt = torch.optim.SGD([self.theta], lr=1e-2)

    def velocity(self, x, t, cond, guidance, detach_uncond=False):
        return x + self.theta

    def step(self, finite):  # what lora.LoRA.step does, minus torchrun, clipping and the EMA
        self.opt.step()
        self.opt.zero_grad()
        return finite


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_update_moves_a_transitions_probability_by_the_sign_of_its_advantage(sign):
    """One transition with A > 0 (A < 0): after one update, its log-probability rose (fell). A sign error in the
    loss, the ratio or the weighting fails one of the two."""
    torch.manual_seed(0)
    shift = Shift()
    policy = sde.policy("flow_grpo", sde.sigmas(2), 0.7, guidance=1.0, std_floor=0.0)
    out = stepgrpo.sample(shift, policy, {}, torch.randn(1, 3), torch.randn(1, 2, 3), [slice(0, 1)])
    batch = stepgrpo.Batch(["p"], torch.tensor([0]), {}, out["states"], out["log_probs"], out["velocities"],
                           plan=[[slice(0, 1)]], advantages=torch.full((1, 2), sign))
    stepgrpo.update(shift, shift, policy, batch, config.Config(beta=0.0, clip_range=10.0))
    with torch.no_grad():
        x_t = batch.states[:, 0]
        after = policy.step(0, x_t, shift.velocity(x_t, None, {}, 1.0), prev_sample=batch.states[:, 1])[1]
    moved = float(after - batch.log_probs[:, 0])
    assert sign * moved > 0, f"A = {sign}: the log-probability moved by {moved}, against the advantage"

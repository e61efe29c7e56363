"""How much of one iteration's GRPO gradient is signal: the gradient's signal-to-noise ratio under each credit.

    python snr.py --batches 20                     # toy world, DDIM SDE: about 2 minutes on 2 CPU cores
    python snr.py --sampler flow_grpo              # any train.py flag sets the setting measured

A batch's policy gradient is a noisy estimate of the true one. Split a batch's prompt groups into two halves and
take each half's gradient at the start of training (ratio 1): their cosine is about |signal|^2 / (|signal|^2 +
|noise|^2 / n), so it rises with the gradient's signal-to-noise ratio, and 0 means the halves share no direction.
One set of rollouts and rewards serves every variant, which differ only in credit (stepwise gains, METHOD §4, vs
the final reward on every step) and in the steps trained (--std-floor, README choice 8). Prints each variant's mean
cosine with its standard error, and its gradient norm.
"""
import argparse
import dataclasses
import sys

import torch

import config
import learner
import rewards
import stepgrpo
from worlds import build_world, sample_groups, score, x0_estimates


def half_gradients(world, params, policy, batch, guidance, cfg):
    """The flattened GRPO gradients of the first and the second half of the batch's trajectories."""
    grads = []
    B = len(batch["adv"])
    for half in (slice(0, B // 2), slice(B // 2, B)):
        learner.backward(world, policy, batch, half, guidance, cfg, 1 / len(policy.trained))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad = None
    return grads


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=3, help="batches measured (each: two halves)")
    args, rest = p.parse_known_args(argv)
    cfg = config.parse_args(rest)
    batches = args.batches
    # twice the prompts of an iteration, so that each half is one iteration's batch; beta 0: at the LoRA's zero
    # init the KL's gradient is 0 anyway; one update, micro-batch = half: the halves are sampled as re-scored
    cfg = dataclasses.replace(cfg, prompts_per_step=2 * cfg.prompts_per_step, beta=0.0, updates_per_iteration=1,
                              micro_batch=cfg.prompts_per_step * cfg.group_size)
    torch.manual_seed(cfg.seed)
    world = build_world(cfg, "cpu")
    reward_fn = rewards.build(cfg.reward or "toy_geneval", "cpu")
    guidance = cfg.guidance or world.default_guidance
    floored = learner.policy(cfg)
    everything = learner.policy(dataclasses.replace(cfg, std_floor=0.0))
    params = learner.add_lora(world.transformer, cfg)
    found = {}
    for i in range(batches):
        prompts, groups, cond, out, _ = sample_groups(world, cfg, floored, guidance, i, "cpu")
        x0 = x0_estimates(world, out, cond, groups, floored.levels, cfg.tweedie_substeps, cfg.tweedie_batch,
                          guidance)[0]
        r = score(world, reward_fn, x0, prompts)[0]
        final = stepgrpo.flow_grpo_advantages(r[:, -1], groups, cfg.global_std, cfg.adv_clip)
        credit = {"stepwise": stepgrpo.stepwise_advantages(r, groups, cfg.per_step_norm, cfg.adv_clip, cfg.global_std),
                  "flow_grpo": final[:, None].expand(-1, cfg.num_steps)}
        for name, adv in credit.items():
            batch = dict(states=out["states"], log_probs=out["log_probs"], cond=cond, adv=adv)
            for policy in (floored, everything):
                g1, g2 = half_gradients(world, params, policy, batch, guidance, cfg)
                cosine = torch.cosine_similarity(g1, g2, 0).item()
                found.setdefault((name, str(policy.trained)), []).append((cosine, g1.norm().item()))
    print(f"{cfg.sampler} SDE, {batches} batches of 2 x {cfg.prompts_per_step // 2} prompts x {cfg.group_size}\n"
          "| credit | steps trained | cosine of half-batch gradients | gradient norm |\n|---|---|---|---|")
    for (name, trained), v in found.items():
        cos = torch.tensor([c for c, _ in v])
        print(f"| {name} | {trained} | {cos.mean():.3f} +- {cos.std() / len(v) ** 0.5:.3f} | "
              f"{sum(n for _, n in v) / len(v):.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

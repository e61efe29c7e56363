"""How much of one iteration's GRPO gradient is signal: the gradient's signal-to-noise ratio under each credit.

    python snr.py --batches 20                     # toy world, DDIM SDE: about 2 minutes on 2 CPU cores
    python snr.py --sampler flow_grpo              # any train.py flag sets the setting measured

A batch's policy gradient is a noisy estimate of the true one. Split a batch's prompt groups into two halves and
take each half's gradient at the start of training (ratio 1): their cosine is about |signal|^2 / (|signal|^2 +
|noise|^2 / n), so it rises with the gradient's signal-to-noise ratio, and 0 means the halves share no direction.
One set of rollouts and rewards serves every variant, which differ only in credit (stepwise gains, METHOD.md §4, vs
the final reward on every step) and in the steps trained (--std-floor, choice 2). Prints each variant's mean
cosine with its standard error, and its gradient norm.
"""
import argparse
import dataclasses
import sys

import torch

import config
import lora
import rewards
import stepgrpo
from runs import build_world


def half_gradients(world, params, policy, batch, cfg):
    """The flattened GRPO gradients of the first and the second half of the batch's trajectories."""
    grads = []
    B = len(batch.advantages)
    for half in (slice(0, B // 2), slice(B // 2, B)):
        stepgrpo.backward(world, policy, batch, half, 1 / len(policy.trained), cfg)
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
    floored = config.policy(cfg, guidance)
    everything = config.policy(dataclasses.replace(cfg, std_floor=0.0), guidance)
    params = lora.add_lora(world.transformer, cfg.lora_rank, cfg.lora_alpha)
    options = dict(per_step=cfg.per_step_norm, global_std=cfg.global_std, adv_clip=cfg.adv_clip)
    found = {}
    for i in range(batches):
        batch = stepgrpo.sample_groups(world, floored, cfg, i, range(cfg.prompts_per_step))
        x0 = stepgrpo.x0_estimates(world, batch, floored, cfg.tweedie_substeps, cfg.tweedie_batch)[0]
        r = stepgrpo.rewards(world, reward_fn, x0, batch.prompts)[0]
        for name, credit in stepgrpo.CREDITS.items():
            adv = credit.advantages(r, batch.groups, **options)
            batch.advantages = adv.expand(-1, cfg.num_steps)
            for policy in (floored, everything):
                g1, g2 = half_gradients(world, params, policy, batch, cfg)
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

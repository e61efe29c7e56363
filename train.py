"""Stepwise-Flow-GRPO (arXiv:2603.28718) and its baseline Flow-GRPO (arXiv:2505.05470): the training loop.

    python train.py                                        # toy world, Stepwise-Flow-GRPO, minutes on a CPU
    python train.py --advantage flow_grpo --sampler flow_grpo                       # the Flow-GRPO baseline
    python train.py --model stabilityai/stable-diffusion-3.5-medium --reward pickscore   # the paper's setup, 1 GPU
    torchrun --nproc_per_node 8 train.py --model stabilityai/stable-diffusion-3.5-medium --prompts-per-step 32

Read this file, then stepgrpo.py, then sde.py: that is one whole iteration, `iteration` below (METHOD.md §6):
    1. G prompts x N trajectories, each group from one x_T        stepgrpo.sample_groups, sde.rollout    (§2-3)
    2. the reward r_k of every state's Tweedie estimate            stepgrpo.x0_estimates, stepgrpo.rewards (§3)
    3. gains and advantages, normalised jointly in each group     stepgrpo.CREDITS                       (§4)
    4. the clipped GRPO update with the KL to the base model      stepgrpo.update                        (§5)
then log and checkpoint: `main`. The rest is machinery, one call each: runs.py (building the run from the flags of
config.py, logs, checkpoints, evaluation and figures), world.py (the model behind the loop: toy.py, sd3.py), lora.py
(the LoRA, its optimizer and EMA), batching.py (noise, order, micro-batches), parallel.py (torchrun).
"""
import sys
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

import batching
import config
import files
import parallel
import runs
import stepgrpo


@contextmanager
def timed(metrics, key, device):
    """metrics[key] = the seconds of the block, counted once the device's queued work is done (not just launched)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    tic = time.perf_counter()
    yield
    sync()
    metrics[key] = time.perf_counter() - tic


def iteration(run, it):
    """One iteration of Stepwise-Flow-GRPO, or of the baseline for another --advantage, timed phase by phase.
    Returns its metrics and, per optimizer step, whether it was taken (a non-finite loss skips it)."""
    cfg = run.cfg
    world = run.world
    policy = run.policy
    credit = stepgrpo.CREDITS[cfg.advantage]
    m = {}
    # ---- 1. sample G prompts x N trajectories, each group from one x_T (§2-3); under torchrun this rank's groups
    with timed(m, "t_rollout", world.device):
        mine = range(cfg.prompts_per_step)[parallel.shard(cfg.prompts_per_step)]
        batch = stepgrpo.sample_groups(world, policy, cfg, it, mine)
    # ---- 2. rewards r_k of every state's Tweedie estimate x0_est(x^(k)) (§3), or of the final image alone (choice 8)
    if credit.intermediate:
        with timed(m, "t_x0", world.device):
            x0, source = stepgrpo.x0_estimates(world, batch, policy, cfg.tweedie_substeps, cfg.tweedie_batch)
        m["x0_states"] = len(batching.distinct(source[:, :-1])[0])  # the distinct states, estimated once (choice 5)
    else:
        x0 = batch.states[:, -1:]  # (B, 1, ...)
        source = None
    with timed(m, "t_reward", world.device):
        r, _ = stepgrpo.rewards(world, run.reward_fn, x0, batch.prompts, source)  # (B, K)
        # ---- 3. advantages (§4) from every rank's rewards, so that --global-std and the logs are the batch's
        r, groups = parallel.gather(r), parallel.gather(batch.groups)
        adv = credit.advantages(r, groups, per_step=cfg.per_step_norm, global_std=cfg.global_std,
                                adv_clip=cfg.adv_clip)
        batch.advantages = adv.expand(len(r), cfg.num_steps)[parallel.shard(len(r))]  # (B, T): this rank's rows
    # ---- 4. the clipped GRPO update with the KL to the base model, U optimizer steps (§5)
    with timed(m, "t_train", world.device):
        stats, taken = stepgrpo.update(world, run.lora, policy, batch, cfg)
    m |= reward_metrics(r, groups)
    m |= {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    m["ratio_first"] = sum(s["ratio"] for s in stats[:len(policy.trained)]) / len(policy.trained)  # before a step
    return parallel.mean_metrics(m), taken


def reward_metrics(r, groups):
    """Mean and std of the final rewards, the share of groups that all scored alike (they teach nothing) and, with
    intermediate rewards, the mean |gain| of every step (Figure 2's data)."""
    final = r[:, -1]
    ties = [float(final[groups == g].std()) < 1e-6 for g in groups.unique()]
    m = dict(reward=final.mean().item(), reward_std=final.std().item(), zero_std_frac=sum(ties) / len(ties))
    if r.shape[1] > 1:
        m["gain_abs"] = stepgrpo.gains(r).abs().mean(0).tolist()
    return m


def main(cfg):
    """Train as cfg says. Returns the history (a dict per iteration), the held-out rewards and the output folder."""
    run, first, history = runs.start(cfg)  # flags checked; world, reward, policy and LoRA built; --out ready
    bar = tqdm(range(first, cfg.steps), initial=first, total=cfg.steps, disable=not run.lead)
    bad = 0  # non-finite losses in a row
    stopped = False
    with runs.interruptible() as stop:  # Ctrl-C: the iteration finishes, a checkpoint is written, the run ends
        for it in bar:
            m = {"it": it}
            with timed(m, "t_eval", run.world.device):
                if it % cfg.eval_every == 0:
                    m |= runs.held_out(run, it, samples="samples_start.png" if it == 0 else None)
            step, taken = iteration(run, it)
            m |= step
            for ok in taken:
                bad = 0 if ok else bad + 1
                if not ok and run.lead:
                    tqdm.write(f"warning: non-finite loss at iteration {it}; update skipped ({bad} in a row)")
            stopped = not parallel.all_true(not stop)  # every rank stops at the same iteration
            # ---- log and checkpoint
            history.append(m)
            runs.log(run, bar, m)
            if bad >= 3 or stopped or (it + 1) % cfg.save_every == 0 or it == cfg.steps - 1:
                runs.save(run, it + 1, history)
            if bad >= 3:
                raise RuntimeError(f"{bad} non-finite losses in a row at iteration {it}: stopped, checkpoint in "
                                   f"{cfg.out}; lower --lr or --clip-range, or raise --beta")
            if stopped:
                if run.lead:
                    print(f"interrupted: checkpoint of iteration {it + 1} in {cfg.out}; continue with --resume true")
                break
    if not stopped:
        runs.finish(run, history)  # the final held-out evaluation and the figures
    return runs.summary(run, history)


def cli(argv=None):
    """`python train.py FLAGS` -> exit code. A user's mistake (files.UserError, config.UsageError, a bad flag) ends
    in one line, `train.py: error: ...`, with code 2, as argparse reports a bad flag; a bug keeps its traceback."""
    try:
        main(config.parse_args(argv))
    except files.UserError as e:
        if parallel.rank() == 0:  # every rank meets the same mistake: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        parallel.finish()
    return 0


if __name__ == "__main__":
    sys.exit(cli())

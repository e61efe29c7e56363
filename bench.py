"""Side-by-side benchmark on the toy world: {Flow-GRPO, Stepwise-Flow-GRPO} x {DDIM-SDE, Flow-GRPO SDE} x seeds.

    python bench.py                        # 4 methods x 5 seeds, the toy preset, 2 runs at a time (one core each)
    python bench.py --seeds 0 1 2 --steps 60 --jobs 1

Every run is `train.py --advantage A --sampler S --seed K` with the same further flags (--set): each method runs
with its own defaults (the baseline as Flow-GRPO runs it: config.flow_grpo_method), and the table says which.
Writes to --out: bench.md (the tables), bench_steps.png and bench_seconds.png (held-out adherence against training
iteration and against training wall-clock seconds, mean over seeds with min-max bands) and bench.json (every curve).
"Steps to match" is the first evaluation at which a method's seed-mean held-out adherence reaches Flow-GRPO's final
one (Flow-GRPO advantage, same sampler); training seconds exclude evaluation.
"""
import argparse
import dataclasses
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import config
import runs
import train

METHODS = [("flow_grpo", "flow_grpo"), ("flow_grpo", "ddim"), ("stepwise", "flow_grpo"), ("stepwise", "ddim")]


def run(job):
    """One training run in its own process; returns its held-out curve and training seconds per iteration."""
    cfg, threads = job
    import torch
    torch.set_num_threads(threads)
    sys.stdout = open(os.path.join(cfg.out + ".log"), "w")  # keep the parallel runs' bars out of the terminal
    history = train.main(cfg)["history"]
    seconds, clock, curve, quality = {}, 0.0, [], []
    for h in history:
        if "eval_reward" in h:
            curve.append((h["it"], clock, h["eval_reward"]))
            quality.append(h.get("eval_quality"))
        spent = sum(h.get(k, 0) for k in ("t_rollout", "t_x0", "t_reward", "t_train"))
        clock += spent
        seconds[h["it"]] = spent
    per_iter = [s for it, s in seconds.items() if it > 0 and s > 0]  # iteration 0 pays one-time warm-up
    return dict(advantage=cfg.advantage, sampler=cfg.sampler, seed=cfg.seed, curve=curve, quality=quality,
                sec_per_iter=sum(per_iter) / len(per_iter), global_std=cfg.global_std, shared_noise=cfg.shared_noise)


def mean_curve(runs):
    """Seed-mean (iteration, seconds, reward) at each evaluation; seeds share the evaluation iterations."""
    n = len(runs)
    points = zip(*(r["curve"] for r in runs))
    return [(pts[0][0], sum(p[1] for p in pts) / n, sum(p[2] for p in pts) / n) for pts in points]


def first_reaching(curve, target):
    return next(((it, sec) for it, sec, r in curve if r >= target), (None, None))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=None, help="training iterations (default: the toy preset's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--set", nargs="*", default=[], help="further Config overrides, e.g. --set eta=0.5 lr=3e-3")
    args = p.parse_args()
    flags = [f"--{kv.split('=')[0].replace('_', '-')}={kv.split('=')[1]}" for kv in args.set]
    flags += [f"--steps={args.steps}"] if args.steps else []
    base = config.parse_args(flags)
    os.makedirs(args.out, exist_ok=True)
    n_eval = len(runs.build_world(base, "cpu").eval_prompts)  # pretrains (or loads) once, before the runs share it
    threads = 1 if args.jobs > 1 else 2
    jobs = []
    for a, s in METHODS:
        method = config.parse_args(flags + [f"--advantage={a}", f"--sampler={s}"])
        jobs += [(dataclasses.replace(method, seed=seed, out=f"{args.out}/{a}-{s}-{seed}"), threads)
                 for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, jobs))
    json.dump(results, open(f"{args.out}/bench.json", "w"))
    report(results, base, args, n_eval)


def report(results, base, args, n_eval):
    """The tables (markdown) and the two figures."""
    groups = {(a, s): [r for r in results if (r["advantage"], r["sampler"]) == (a, s)] for a, s in METHODS}
    curves = {k: mean_curve(v) for k, v in groups.items()}
    cost = {k: sum(r["sec_per_iter"] for r in v) / len(v) for k, v in groups.items()}
    lines = [f"Toy world, {len(args.seeds)} seeds, {base.steps} iterations, {base.prompts_per_step} prompts x "
             f"{base.group_size}, T = {base.num_steps}, T' = {base.tweedie_substeps}, eta = {base.eta}, a = "
             f"{base.noise_level}, lr = {base.lr}, beta = {base.beta}; held-out adherence = mean toy reward over "
             f"the {n_eval} held-out prompts x {base.eval_repeats} noises, ODE sampling, seed-mean.", "",
             "| advantage | sampler | global std | shared x_T | held-out start | held-out final | render quality "
             "final | s / iteration | steps to Flow-GRPO's final | training s to it |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (a, s), curve in curves.items():
        target = curves[("flow_grpo", s)][-1][2]
        it, sec = first_reaching(curve, target)
        ref_it, ref_sec = first_reaching(curves[("flow_grpo", s)], target)
        ratio = f" ({it / ref_it:.2f}x)" if it is not None and ref_it else ""
        runs = groups[(a, s)]
        quality = [r["quality"][-1] for r in runs if r["quality"][-1] is not None]
        quality = f"{sum(quality) / len(quality):.3f}" if quality else "-"
        lines.append(f"| {a} | {s} | {runs[0]['global_std']} | {runs[0]['shared_noise']} | {curve[0][2]:.3f} | "
                     f"{curve[-1][2]:.3f} | {quality} | {cost[(a, s)]:.2f} | "
                     f"{it if it is not None else 'not reached'}{ratio} | "
                     f"{f'{sec:.0f} (vs {ref_sec:.0f})' if sec is not None else '-'} |")
    for s in ("ddim", "flow_grpo"):
        lines.append(f"\nStepwise / Flow-GRPO cost per iteration, {s} sampler: "
                     f"{cost[('stepwise', s)] / cost[('flow_grpo', s)]:.2f}x")
    lines += ["", "Per seed, held-out adherence final (and at the middle evaluation); Stepwise ahead of Flow-GRPO "
              "with the same sampler:", "", "| sampler | seed | Flow-GRPO | Stepwise | Stepwise ahead |",
              "|---|---|---|---|---|"]
    for s in ("ddim", "flow_grpo"):
        for flow, step in zip(groups[("flow_grpo", s)], groups[("stepwise", s)]):
            mid = len(flow["curve"]) // 2
            f, w = flow["curve"], step["curve"]
            lines.append(f"| {s} | {flow['seed']} | {f[-1][2]:.3f} ({f[mid][2]:.3f}) | {w[-1][2]:.3f} "
                         f"({w[mid][2]:.3f}) | {'yes' if w[-1][2] > f[-1][2] else 'NO'} |")
    text = "\n".join(lines)
    open(f"{args.out}/bench.md", "w").write(text + "\n")
    print(text)
    for axis, name, label in ((0, "steps", "training iteration"), (1, "seconds", "training wall-clock seconds")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (a, s), runs in groups.items():
            xs = [p[axis] for p in curves[(a, s)]]
            ys = [[p[2] for p in r["curve"]] for r in runs]
            line = ax.plot(xs, [sum(c) / len(c) for c in zip(*ys)], "-" if a == "stepwise" else "--",
                           label=f"{'Stepwise' if a == 'stepwise' else 'Flow-GRPO'} + {s} SDE")[0]
            ax.fill_between(xs, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)], alpha=0.15,
                            color=line.get_color())
        ax.set_xlabel(label)
        ax.set_ylabel("held-out adherence (toy GenEval reward)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(f"{args.out}/bench_{name}.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()

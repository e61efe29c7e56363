"""SD3.5 Medium at the paper's setting: one Stepwise-Flow-GRPO and one Flow-GRPO iteration, timed and counted.

Random weights from the published configs, no download: the SD3.5 Medium transformer, the SD3 VAE and a CLIP-H
sized PickScore. Prompt encodings are fixed random tensors of SD3's shapes (the text encoders run once a prompt,
before training: choice 21). Each iteration is train.py's own (train.iteration) at the sd35 preset, each
method with its own defaults (config.flow_grpo_method for the baseline): 512 px, T = 10, T' = 5, CFG 4.5,
4 prompts x 8, micro-batches of 8, 2 optimizer steps, bf16 transformer, float32 VAE, LoRA r 32 alpha 64.
Model FLOPs are counted, not estimated: every row through the transformer (forward, or forward + backward in
training), the VAE decoder and PickScore is counted in the iteration, and each row's FLOPs at full size come from
torch's FlopCounterMode on meta tensors: with --tiny (tiny models run the loop on the CPU) the counts need neither a
GPU nor memory; only the seconds are the tiny models'.

    python bench_sd3.py --tiny      # CPU, a minute: full-size FLOPs per phase and the Stepwise/Flow-GRPO ratio
    python bench_sd3.py --tiny --set tweedie_substeps=3                         # the same at another setting
    python bench_sd3.py --gradient-checkpointing true --out bench_gc.json     # a CUDA GPU: seconds, MFU, memory too
    python bench_sd3.py --gradient-checkpointing false --out bench_nogc.json
Nothing is downloaded: the weights are random, the architecture and the sizes those of the published configs.
"""
import argparse
import dataclasses
import json
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import clip_scorers
import config
import lora
import rewards
import runs
import sd3
import train
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# stabilityai/stable-diffusion-3.5-medium transformer/config.json and vae/config.json
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
# --tiny: the same code paths (dual attention, rms qk-norm, a 4-level VAE of factor 8) at CPU size
TINY_TRANSFORMER = dict(SD35_MEDIUM, sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                        pos_embed_max_size=16, dual_attention_layers=(0,))
TINY_VAE = dict(SD3_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8)
TINY_CLIP = dict(projection_dim=16,
                 text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=77),
                 vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    patch_size=8, image_size=32))
TOKENS = 77 + sd3.MAX_SEQUENCE_LENGTH  # SD3's joint context: CLIP-L|CLIP-G's 77 tokens, then T5's 128


class FixedEncodingWorld(sd3.SD3World):
    """SD3World on a pipeline without text encoders: each new prompt gets a random encoding of SD3's shapes."""

    def _text_encode(self, prompts):
        gen = torch.Generator().manual_seed(len(self._cache))
        config = self.transformer.config
        randn = lambda *shape: torch.randn(shape, generator=gen).to(self.device, self.dtype)
        return [{"prompt_embeds": randn(TOKENS, config.joint_attention_dim),  # (L, D), L = 77 + 128
                 "pooled_prompt_embeds": randn(config.pooled_projection_dim)} for _ in prompts]


def byte_tokenizer():
    """A CLIP tokenizer without files: the 256 byte characters, their </w> forms and the two specials (514 ids)."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    return CLIPTokenizer(vocab=vocab | {"<|startoftext|>": 512, "<|endoftext|>": 513}, merges=[], model_max_length=77)


def build(tiny, device, gradient_checkpointing):
    """The world (transformer + VAE, random weights) and a PickScore reward over a random CLIP of the right size."""
    specials = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513)  # pooling reads the eos position
    clip = TINY_CLIP if tiny else clip_scorers.CLIP_H_CONFIG  # the CLIP-H that PickScore_v1 fine-tunes
    with torch.device(device):  # initialise on the GPU: a CPU init of 3.5B random parameters takes minutes
        transformer = SD3Transformer2DModel(**(TINY_TRANSFORMER if tiny else SD35_MEDIUM))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD3_VAE))
        model = CLIPModel(CLIPConfig(projection_dim=clip["projection_dim"], vision_config=clip["vision_config"],
                                     text_config=clip["text_config"] | specials))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                                    **dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                     "text_encoder_3", "tokenizer_3"]))
    world = FixedEncodingWorld(pipe, device, gradient_checkpointing=gradient_checkpointing,
                               resolution=64 if tiny else 512)
    side = clip["vision_config"]["image_size"]
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": side},
                                                                 crop_size={"height": side, "width": side}),
                              tokenizer=byte_tokenizer())
    return world, clip_scorers.PickScore(model, processor).to(device)  # float32, as PickScore_v1 loads


class Counter:
    """Rows through each model during an iteration: transformer forwards (no grad), training forwards (with grad:
    their backward follows), VAE decodes, reward images. CFG's doubled batch counts twice."""

    def __init__(self, world, reward_fn):
        self.rows = dict(forward=0, train=0, decode=0, reward=0)
        velocity = world.velocity
        decode = world.decode

        def counted_velocity(x, t, cond, guidance, **kw):
            self.rows["train" if torch.is_grad_enabled() else "forward"] += len(x) * (1 if guidance == 1 else 2)
            return velocity(x, t, cond, guidance, **kw)

        def counted_decode(x0):
            self.rows["decode"] += len(x0)
            return decode(x0)

        def counted_reward(images, prompts):
            self.rows["reward"] += len(images)
            return reward_fn(images, prompts)
        world.velocity = counted_velocity
        world.decode = counted_decode
        self.reward_fn = counted_reward


def row_flops(cfg):
    """Model FLOPs of one row at full size, on meta tensors: transformer forward, forward + backward with the LoRA
    (base weights frozen: activation gradients only), VAE decode at cfg.resolution, PickScore (rewards.py)."""
    side = cfg.resolution // 8
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_MEDIUM).to(torch.bfloat16)
        lora.add_lora(transformer, cfg.lora_rank, cfg.lora_alpha)
        vae = AutoencoderKL(**SD3_VAE)
    meta = dict(device="meta")
    inputs = dict(hidden_states=torch.randn(1, 16, side, side, dtype=torch.bfloat16, **meta),
                  timestep=torch.full((1,), 500.0, **meta), return_dict=False,
                  encoder_hidden_states=torch.randn(1, TOKENS, 4096, dtype=torch.bfloat16, **meta),
                  pooled_projections=torch.randn(1, 2048, dtype=torch.bfloat16, **meta))
    counted = {}
    for name, fn in [("forward", lambda: transformer(**inputs)),
                     ("train", lambda: transformer(**inputs)[0].float().sum().backward()),
                     ("decode", lambda: vae.decode(torch.randn(1, 16, side, side, **meta)))]:
        with FlopCounterMode(display=False) as flops, torch.set_grad_enabled(name == "train"):
            fn()
        counted[name] = flops.get_total_flops()
    counted["reward"] = rewards.flops_per_image("pickscore")
    return counted


PHASES = dict(rollout="t_rollout", tweedie="t_x0", reward="t_reward", train="t_train")


def iteration(world, reward_fn, trained, cfg, warmup):
    """train.iteration of cfg (after `warmup` untimed ones) training the LoRA `trained`: seconds per phase, rows per
    model, peak memory."""
    device = world.device
    cfg = dataclasses.replace(cfg, guidance=cfg.guidance or world.default_guidance)
    pi = config.policy(cfg, cfg.guidance)
    run = runs.Run(cfg, world, reward_fn, pi, trained, ranks=1, lead=True)
    for it in range(warmup):  # kernels, cuDNN autotuning of the VAE's convolutions, allocator growth
        train.iteration(run, it)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    counter = Counter(world, reward_fn)
    run.reward_fn = counter.reward_fn
    m, finite = train.iteration(run, warmup)
    del world.velocity, world.decode  # back to the class's own methods
    assert all(finite) and math.isfinite(m["loss"]), "non-finite training loss"
    seconds = {phase: m.get(key, 0.0) for phase, key in PHASES.items()}
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return dict(seconds=seconds | {"iteration": sum(seconds.values())}, rows=counter.rows, peak_memory_gb=peak_gb,
                trained_steps=pi.trained)


def flops_by_phase(result, per_row):
    """TFLOPs of each phase: forwards split by phase (rollout B T, the rest x0_est and the KL's reference)."""
    rows = result["rows"]
    rollout = result["rollout_rows"]
    return dict(rollout=rollout * per_row["forward"] / 1e12,
                tweedie=(rows["forward"] - rollout - result["reference_rows"]) * per_row["forward"] / 1e12,
                reward=(rows["decode"] * per_row["decode"] + rows["reward"] * per_row["reward"]) / 1e12,
                train=(rows["train"] * per_row["train"] + result["reference_rows"] * per_row["forward"]) / 1e12)


def methods():
    """The two methods at the sd35 preset, each with its own defaults, as train.py's flags make them."""
    stepwise = config.parse_args(["--model", "bench"])
    flow_grpo = config.parse_args(["--model", "bench", "--advantage", "flow_grpo", "--sampler", "flow_grpo"])
    return {"stepwise": stepwise, "flow_grpo": flow_grpo}


def report(results, per_row, peak_tflops):
    """The markdown table: seconds, TFLOPs and rows per phase; the FLOP ratio; MFU and memory on a GPU."""
    lines = ["| method | phase | rows (transformer / VAE / reward) | TFLOP | s | TFLOP/s |",
             "|---|---|---|---|---|---|"]
    totals = {}
    for name, r in results.items():
        tflop = flops_by_phase(r, per_row)
        totals[name] = sum(tflop.values())
        for phase, f in tflop.items():
            sec = r["seconds"][phase]
            rate = f"{f / sec:.0f}" if sec and r["peak_memory_gb"] is not None else "-"
            lines.append(f"| {name} | {phase} | {r['phase_rows'][phase]} | {f:.0f} | {sec:.2f} | {rate} |")
        lines.append(f"| {name} | **iteration** | | **{totals[name]:.0f}** | **{r['seconds']['iteration']:.2f}** | |")
    step, flow = results["stepwise"], results["flow_grpo"]
    lines += ["", f"Stepwise / Flow-GRPO model FLOPs per iteration: {totals['stepwise'] / totals['flow_grpo']:.2f}x; "
              f"seconds: {step['seconds']['iteration'] / flow['seconds']['iteration']:.2f}x"]
    if step["peak_memory_gb"] is not None:
        for name, r in results.items():
            mfu = flops_by_phase(r, per_row)["train"] / r["seconds"]["train"] / peak_tflops
            lines.append(f"{name}: training MFU {100 * mfu:.1f}% of {peak_tflops:.0f} TFLOP/s, peak memory "
                         f"{r['peak_memory_gb']:.1f} GB")
    return "\n".join(lines), totals


REWARDS = ("pickscore", "clip", "hpsv2", "aesthetic", "imagereward", "unifiedreward", "ocr")


def reward_costs(results, totals, per_row):
    """What each reward would cost in place of PickScore: its FLOPs an image at full size, its share of one iteration
    of each method (the iteration's other FLOPs unchanged), and the Stepwise / Flow-GRPO ratio it makes."""
    lines = ["| reward | GFLOP / image | Stepwise: TFLOP, share of its iteration | Flow-GRPO: TFLOP, share | "
             "Stepwise / Flow-GRPO |", "|---|---|---|---|---|"]
    for name in REWARDS:
        per_image = rewards.flops_per_image(name)
        cells = []
        iteration = {}
        for method in ("stepwise", "flow_grpo"):
            images = results[method]["rows"]["reward"]
            cost = images * per_image / 1e12
            iteration[method] = totals[method] - images * per_row["reward"] / 1e12 + cost
            cells.append(f"{cost:,.0f} ({images} images), {100 * cost / iteration[method]:.0f}%")
        ratio = iteration["stepwise"] / iteration["flow_grpo"]
        lines.append(f"| {name} | {per_image / 1e9:,.0f} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
    return "\n".join(lines)


def annotate(result, cfg):
    """Which forward rows were the rollout's, which the KL reference's, and rows per phase for the table."""
    B, T = cfg.prompts_per_step * cfg.group_size, cfg.num_steps
    g = 1 if (cfg.guidance or sd3.SD3World.default_guidance) == 1 else 2  # rows per sample: CFG doubles them
    result["rollout_rows"] = B * T * g
    result["reference_rows"] = result["rows"]["train"] if cfg.beta > 0 else 0  # one reference forward per training one
    rows = result["rows"]
    result["phase_rows"] = dict(rollout=f"{B * T * g} / - / -",
                                tweedie=f"{rows['forward'] - B * T * g - result['reference_rows']} / - / -",
                                reward=f"- / {rows['decode']} / {rows['reward']}",
                                train=f"{rows['train']} (+ {result['reference_rows']} ref.) / - / -")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models at 64 px on the CPU (the FLOPs stay full-size)")
    p.add_argument("--gradient-checkpointing", type=config._boolean, default=True)
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak measured on the H200 (dense: 989)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations of each method first")
    p.add_argument("--set", nargs="*", default=[], help="Config overrides for both methods, e.g. tweedie_substeps=3")
    p.add_argument("--out", default="", help="JSON results path")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    tic = time.perf_counter()
    world, reward_fn = build(args.tiny, device, args.gradient_checkpointing)
    overrides = dict(kv.split("=") for kv in args.set)
    runs = {}
    for name, cfg in methods().items():
        kinds = {f.name: f.type for f in dataclasses.fields(cfg)}
        cfg = dataclasses.replace(cfg, resolution=64 if args.tiny else 512,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  **{k: kinds[k](v) for k, v in overrides.items()})
        config.check(cfg)
        runs[name] = cfg
    trained = lora.LoRA(world.transformer, runs["stepwise"])  # both methods train it: only their seconds count
    n_params = sum(p.numel() for p in world.transformer.parameters())
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) | transformer "
          f"{n_params:,} parameters | built in {time.perf_counter() - tic:.1f} s | gradient checkpointing "
          f"{args.gradient_checkpointing} | torch {torch.__version__} | overrides {overrides}", flush=True)
    results = {name: annotate(iteration(world, reward_fn, trained, cfg, args.warmup), cfg)
               for name, cfg in runs.items()}
    per_row = row_flops(dataclasses.replace(runs["stepwise"], resolution=512))
    table, totals = report(results, per_row, args.peak_tflops)
    print(table)
    print("\nEach reward in PickScore's place, model FLOPs at full size:\n" + reward_costs(results, totals, per_row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), device=str(device), torch=torch.__version__, row_tflops=per_row,
                           configs={k: dataclasses.asdict(v) for k, v in runs.items()}, results=results,
                           tflop=totals, transformer_parameters=n_params), f, indent=1)


if __name__ == "__main__":
    main()

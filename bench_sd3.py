"""Time one Stepwise-Flow-GRPO and one Flow-GRPO iteration of SD3.5 Medium at the paper's setting on one GPU.

Random weights from the published configs, no download: the SD3.5 Medium transformer, the SD3 VAE and a CLIP-H
sized PickScore. Prompt encodings are fixed random tensors of SD3's shapes: the text encoders run once per prompt,
outside the iteration, and wait off the GPU (sd3.py CHOICE 4). Every phase is train.py's own: worlds.sample,
worlds.x0_estimates, worlds.score, train.update. Reports seconds per phase, the model FLOPs utilisation (MFU) of the
training step, and the peak GPU memory of each method. Setting (METHOD.md §5): 512 px, T = 10, T' = 5, CFG 4.5, one
group of 8, bf16 transformer, float32 VAE and LoRA, LoRA r 32 alpha 64.

    python bench_sd3.py --tiny                          # CPU, tiny configs, seconds: proves the script end to end
    python bench_sd3.py --gradient-checkpointing true --out bench.json                  # one GPU, about 2 minutes

The GPU machine's image has torch 2.11, transformers 5.17, huggingface_hub 1.33 (diffusers 0.42.1 needs >= 1.32),
safetensors 0.8 (needs >= 0.8), accelerate, numpy, regex, requests, filelock, Pillow, tqdm and matplotlib, but no
diffusers; its peft version is unread (diffusers needs >= 0.17, requirements.txt >= 0.21), so peft travels too.
Both wheels are pure Python. Here, once, in the repo root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2
Then one device run, carry [".whl"], timeout_s 540 (about 3 minutes expected; both checkpointing settings):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; python3 -m pip show peft transformers | grep -E "^(Name|Version)"; python3 bench_sd3.py --gradient-checkpointing true --out $OUT/bench_gc.json 2>&1 | tee $OUT/bench_gc.md; python3 bench_sd3.py --gradient-checkpointing false --out $OUT/bench_nogc.json 2>&1 | tee $OUT/bench_nogc.md
"""
import argparse, dataclasses, json, math, time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import rewards, sd3, stepgrpo, train
from worlds import base_model, group_noise, rows, sample, score, x0_estimates

# stabilityai/stable-diffusion-3.5-medium transformer/config.json and vae/config.json
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the CLIP-H that PickScore_v1 fine-tunes
CLIP_H = dict(projection_dim=1024,
              text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                               max_position_embeddings=77, hidden_act="gelu"),
              vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                                 patch_size=14, image_size=224, hidden_act="gelu"))
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
    clip = TINY_CLIP if tiny else CLIP_H
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
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                                                 crop_size={"height": side, "width": side}),
                              tokenizer=byte_tokenizer())
    return world, rewards.PickScore(model, processor).to(device)  # float32, as PickScore_v1 loads


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def flops_per_trajectory(world, out, cond, levels, step, guidance, beta):
    """Model FLOPs of one trajectory's transition: a forward, and for training its backward and the reference forward.

    Counted on one trajectory at the state of step `step` (FLOPs scale with the batch), with gradient checkpointing off
    so that its recomputation is not counted: that makes it MFU, not hardware utilisation."""
    x, t, c = out["states"][:1, step], levels[step].expand(1).to(out["states"].device), rows(cond, slice(0, 1))
    checkpointing = world.transformer.is_gradient_checkpointing
    world.transformer.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        world.velocity(x, t, c, guidance)
    with FlopCounterMode(display=False) as training:
        world.velocity(x, t, c, guidance).sum().backward()
        if beta > 0:
            with torch.no_grad(), base_model(world.transformer):
                world.velocity(x, t, c, guidance)
    for p in world.transformer.parameters():
        p.grad = None
    if checkpointing:
        world.transformer.enable_gradient_checkpointing()
    return forward.get_total_flops(), training.get_total_flops()


def iteration(world, reward_fn, opt, cfg, gen, device):
    """train.main's loop body for one iteration, phase by phase: seconds per phase, and what the FLOP count needs."""
    levels, step_fn, trained = train.policy(cfg)
    G, N, guidance = cfg.prompts_per_step, cfg.group_size, cfg.guidance or world.default_guidance
    prompts, groups = [world.train_prompts[g] for g in range(G) for _ in range(N)], torch.arange(G).repeat_interleave(N)
    x1 = group_noise(world, cfg, gen, device)
    cond = world.encode(prompts)  # the text encoders' work, outside the iteration (cached by the world)
    sec, tic = {}, clock(device)
    out = sample(world, cond, x1, levels, step_fn, guidance, cfg.micro_batch, gen)
    sec["rollout"], tic = clock(device) - tic, clock(device)
    if cfg.advantage == "stepwise":
        x0 = x0_estimates(world, out, cond, levels, cfg.tweedie_substeps, cfg.tweedie_batch, guidance)
        sec["tweedie"], tic = clock(device) - tic, clock(device)
        r = score(world, reward_fn, x0, prompts)[0]  # (B, T+1)
        adv = stepgrpo.stepwise_advantages(r, groups, cfg.per_step_norm, cfg.adv_clip)
    else:
        sec["tweedie"] = 0.0
        final = score(world, reward_fn, out["states"][:, -1:], prompts)[0][:, 0]  # (B,)
        adv = stepgrpo.flow_grpo_advantages(final, groups, adv_clip=cfg.adv_clip)[:, None].expand(G * N, cfg.num_steps)
    sec["reward"], tic = clock(device) - tic, clock(device)
    losses = train.update(world, opt, out, cond, adv.to(device), levels, step_fn, trained, guidance, cfg)[1]
    sec["train"] = clock(device) - tic
    assert all(map(math.isfinite, losses)), "non-finite training loss"
    return sec, dict(out=out, cond=cond, levels=levels, trained=trained, guidance=guidance)


def bench(cfg, world, reward_fn, opt, device, peak_tflops, warmup):
    """Time one iteration of cfg (after `warmup` untimed ones); count its FLOPs; its peak memory."""
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(warmup):  # kernels, cuDNN autotuning of the VAE's convolutions, allocator growth
        iteration(world, reward_fn, opt, cfg, gen, device)
    if device.type == "cuda":
        torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    sec, run = iteration(world, reward_fn, opt, cfg, gen, device)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    B, T = cfg.prompts_per_step * cfg.group_size, cfg.num_steps
    f_fwd, f_train = flops_per_trajectory(world, run["out"], run["cond"], run["levels"], run["trained"][0],
                                          run["guidance"], cfg.beta)
    stepwise = cfg.advantage == "stepwise"
    flops = dict(rollout=f_fwd * B * T, tweedie=f_fwd * B * T * (cfg.tweedie_substeps - 1) if stepwise else 0,
                 train=f_train * B * len(run["trained"]))
    tflops = {k: flops[k] / sec[k] / 1e12 if sec[k] else 0.0 for k in flops}
    return dict(seconds=sec | {"iteration": sum(sec.values())}, tflops_per_s=tflops, peak_memory_gb=peak_gb,
                train_mfu=tflops["train"] / peak_tflops, trained_steps=run["trained"], model_flops=flops)


def report(results, args):
    """A markdown table of the two methods and the three targets."""
    lines = ["| method | rollout s | Tweedie s | decode+reward s | train s | iteration s | train TFLOP/s | train MFU "
             "| peak GB |", "|" + " --- |" * 9]
    for name, r in results.items():
        s, gb = r["seconds"], r["peak_memory_gb"]
        lines.append(f"| {name} | {s['rollout']:.2f} | {s['tweedie']:.2f} | {s['reward']:.2f} | {s['train']:.2f} | "
                     f"{s['iteration']:.2f} | {r['tflops_per_s']['train']:.1f} | {100 * r['train_mfu']:.1f}% | "
                     + (f"{gb:.1f} |" if gb is not None else "n/a |"))
    step, flow = results["stepwise"], results["flow_grpo"]
    ratio = step["seconds"]["iteration"] / flow["seconds"]["iteration"]
    gbs = [r["peak_memory_gb"] for r in results.values()]
    gb = None if None in gbs else max(gbs)  # None: not on a GPU
    mfu = min(r["train_mfu"] for r in results.values())
    targets = {"stepwise / Flow-GRPO iteration <= 1.5": (ratio, ratio <= 1.5),
               "training MFU >= 35%": (mfu, mfu >= 0.35),
               "peak memory < 24 GB (gradient checkpointing on)":
                   (gb, gb < 24 if gb is not None and args.gradient_checkpointing else None)}
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    lines += [f"| {k} | {'n/a' if v is None else f'{v:.3g}'} | {'n/a' if ok is None else 'yes' if ok else 'NO'} |"
              for k, (v, ok) in targets.items()]
    return "\n".join(lines), {k: dict(value=v, met=ok) for k, (v, ok) in targets.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs at 64 px: a CPU check of the script, seconds")
    p.add_argument("--gradient-checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations of each method first")
    p.add_argument("--out", default="", help="JSON results path")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    tic = time.perf_counter()
    world, reward_fn = build(args.tiny, device, args.gradient_checkpointing)
    stepwise = dataclasses.replace(train.sd35(train.Config()), model="bench", prompts_per_step=1, group_size=8,
                                   resolution=64 if args.tiny else 512,
                                   gradient_checkpointing=args.gradient_checkpointing)
    flow_grpo = dataclasses.replace(stepwise, advantage="flow_grpo", sampler="flow_grpo", shared_noise=False)
    train.check(stepwise), train.check(flow_grpo)
    params = train.add_lora(world.transformer, stepwise)
    opt = torch.optim.AdamW(params, lr=stepwise.lr, weight_decay=stepwise.weight_decay)
    n_params = sum(p.numel() for p in world.transformer.parameters())
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) | transformer "
          f"{n_params:,} parameters | built in {time.perf_counter() - tic:.1f} s | gradient checkpointing "
          f"{args.gradient_checkpointing} | torch {torch.__version__}", flush=True)
    results = {}
    for name, cfg in (("stepwise", stepwise), ("flow_grpo", flow_grpo)):
        results[name] = bench(cfg, world, reward_fn, opt, device, args.peak_tflops, args.warmup)
        print(name, json.dumps(results[name]["seconds"]), flush=True)
    table, targets = report(results, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            configs = {"stepwise": dataclasses.asdict(stepwise), "flow_grpo": dataclasses.asdict(flow_grpo)}
            json.dump(dict(args=vars(args), device=str(device), torch=torch.__version__, configs=configs,
                           transformer_parameters=n_params, results=results, targets=targets), f, indent=1)


if __name__ == "__main__":
    main()

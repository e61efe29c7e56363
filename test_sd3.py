"""Tests of the paper's path, offline: sd3.py (SD3World) and rewards.py (PickScore, CLIP score) on tiny random
components of the real diffusers and transformers classes, and train.py on them end to end.
"""
import dataclasses
import json
import math
import os
import re
import time
import types
from functools import partial

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import get_peft_model_state_dict
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

import bench_sd3
import clip_scorers
import config
import files
import lora
import rewards
import runs
import sd3
import sde
import train
from conftest import dead_ends, relative_error, tiny_clip, tiny_clip_tokenizer, tiny_text_config
from world import World, base_model

PROMPTS = ["a photo of two red apples", "a blue bench left of a yellow dog"]


# ---------------------------------------------------------------- tiny components

def tiny_pipe(seed=0):
    """A StableDiffusion3Pipeline of ~20k random parameters: 8x8 latents, VAE factor 1."""
    torch.manual_seed(seed)
    t5_tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
                               + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"], extra_ids=0)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                          caption_projection_dim=16, pooled_projection_dim=32),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                          use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(tiny_text_config()), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config()), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                               relative_attention_num_buckets=8)),
        tokenizer_3=t5_tokenizer)


def tiny_world(dtype=torch.float32, **kwargs):
    """An SD3World on tiny_pipe; its text encoders stay resident unless told, so any prompt can be encoded."""
    kwargs.setdefault("text_encoders", "resident")
    return sd3.SD3World(tiny_pipe(), "cpu", dtype=dtype, resolution=8, **kwargs)


@pytest.fixture
def world():
    return tiny_world()


def add_lora(transformer, seed=1):
    """Train.py's adapter (rank 4 here), its zero-initialised B set by hand so that it changes the output."""
    from peft import LoraConfig
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=lora.LORA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------- SD3World

def test_sd3_world_is_a_world(world):
    """SD3World implements world.World, the protocol the loop needs."""
    assert isinstance(world, World)


def test_velocity_with_guidance_is_the_pipelines_cfg_arithmetic(world):
    """velocity(g) = v_u + g (v_c - v_u) from the pipeline's own encodings, [uncond; cond] in one batch."""
    pipe = world.pipe
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                  max_sequence_length=sd3.MAX_SEQUENCE_LENGTH)
    x, t = torch.randn(2, *world.latent_shape), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=1000 * torch.cat([t, t]),
                             encoder_hidden_states=torch.cat([npe, pe]),
                             pooled_projections=torch.cat([npooled, pooled]), return_dict=False)[0]
        v_u, v_c = v.chunk(2)
        cond = world.encode(PROMPTS)
        guided = world.velocity(x, t, cond, 4.5)
        assert relative_error(guided, v_u + 4.5 * (v_c - v_u)) < 1e-5, "CFG arithmetic differs"
        assert relative_error(world.velocity(x, t, cond, 1.0), v_c) < 1e-5, "guidance 1 is not the conditional pass"


@pytest.mark.parametrize("sampler", ["ddim", "flow_grpo"])
def test_noiseless_rollout_of_velocity_reproduces_the_pipelines_sampler(world, sampler):
    """sde.rollout over sde.sigmas with either sampler at zero noise equals the pipeline's own sampler from x_T."""
    T, g = 6, 4.5
    x1 = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    expected = world.pipe(PROMPTS, latents=x1, num_inference_steps=T, guidance_scale=g, output_type="latent",
                          max_sequence_length=sd3.MAX_SEQUENCE_LENGTH).images
    velocity = partial(world.velocity, cond=world.encode(PROMPTS), guidance=g)
    ode = sde.policy(sampler, sde.sigmas(T, 3.0), 0.0, guidance=g)  # eta = 0, a = 0
    out = sde.rollout(velocity, x1, ode, None)  # zero noise: no noise needed
    err = relative_error(out["states"][:, -1], expected)
    assert err < 1e-5, f"rollout differs from the pipeline by {err}: timestep scale, CFG order or schedule is wrong"


def test_decode_equals_the_pipelines_image_output(world):
    """decode(latents) equals the pipeline's output_type='pt' images (scaling, shift, [0, 1] mapping)."""
    x1 = torch.randn(2, *world.latent_shape)
    kwargs = dict(latents=x1, num_inference_steps=3, guidance_scale=4.5, max_sequence_length=sd3.MAX_SEQUENCE_LENGTH)
    latents = world.pipe(PROMPTS, output_type="latent", **kwargs).images
    images = world.pipe(PROMPTS, output_type="pt", **kwargs).images
    decoded = world.decode(latents)
    assert decoded.dtype == torch.float32 and decoded.shape == (2, 3, 8, 8)
    assert relative_error(decoded, images) < 1e-5, "VAE scaling/shift or the [-1, 1] -> [0, 1] map is wrong"


def test_encode_is_batch_first_cached_and_its_negative_is_the_empty_prompt(world):
    """encode rows follow the prompts, repeat exactly from the cache, and the negatives encode ''."""
    cond = world.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                         "negative_pooled_prompt_embeds"}
    assert all(v.shape[0] == 3 for v in cond.values()), "encode must be batch-first"
    torch.testing.assert_close(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    empty = world.encode([""])
    torch.testing.assert_close(cond["negative_prompt_embeds"][1], empty["prompt_embeds"][0])
    torch.testing.assert_close(cond["negative_pooled_prompt_embeds"][1], empty["pooled_prompt_embeds"][0])
    again = world.encode([PROMPTS[1]])
    torch.testing.assert_close(again["prompt_embeds"][0], cond["prompt_embeds"][1], msg="cache returned another row")


def test_latent_shape_follows_resolution_and_a_bad_resolution_is_refused():
    """latent_shape = (C, resolution / vae factor, ...); a resolution off the patch grid raises."""
    assert tiny_world().latent_shape == (4, 8, 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        sd3.SD3World(tiny_pipe(), "cpu", resolution=7)


def test_base_weights_are_frozen_and_a_float32_lora_trains_through_bf16_velocity():
    """All base weights are frozen; a LoRA (float32 params on bf16 weights) gets finite gradients from velocity."""
    world = tiny_world(dtype=torch.bfloat16)
    assert not any(p.requires_grad for m in world.pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters()), "a base weight is trainable"
    add_lora(world.transformer)
    lora = [p for p in world.transformer.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    cond = world.encode(PROMPTS)
    v = world.velocity(torch.randn(2, *world.latent_shape), torch.tensor([0.7, 0.2]), cond, 4.5)
    assert v.dtype == torch.float32
    v.square().mean().backward()
    grads = [p.grad for p in lora]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


def test_the_lora_sits_on_flow_grpos_modules_of_a_dual_attention_sd35():
    """On an SD3.5-shaped transformer (dual attention in block 0): q, k, v, out of both streams' joint attention
    are adapted, SD3.5's second attention attn2 is not (Flow-GRPO's target list)."""
    transformer = SD3Transformer2DModel(**bench_sd3.TINY_TRANSFORMER)
    lora.add_lora(transformer, rank=2, alpha=4)
    adapted = {name for name, m in transformer.named_modules() if hasattr(m, "lora_A")}
    pattern = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    want = {name for name, _ in transformer.named_modules() if re.fullmatch(pattern, name)}
    assert any(".attn2." in name for name, _ in transformer.named_modules()), "the test model lacks attn2"
    assert adapted == want, f"adapted beyond Flow-GRPO's list: {sorted(adapted - want)[:4]}, " \
                            f"missed: {sorted(want - adapted)[:4]}"
    blocks = len(transformer.transformer_blocks)
    assert sum(name.endswith("add_k_proj") for name in adapted) == blocks, "the text stream must be adapted"


def test_the_training_velocity_has_no_gradient_through_the_unconditional_branch():
    """detach_uncond (Flow-GRPO's training forward): the LoRA's gradient of v = v_u + g (v_c - v_u) is that of
    g v_c alone; without it the unconditional branch adds its (1 - g) v_u part."""
    world = tiny_world()
    add_lora(world.transformer)
    lora = [p for p in world.transformer.parameters() if p.requires_grad]
    cond = world.encode(PROMPTS)
    x, t, g = torch.randn(2, *world.latent_shape), torch.tensor([0.7, 0.2]), 4.5
    w = torch.randn(2, *world.latent_shape)

    def grad(fn):
        for p in lora:
            p.grad = None
        (fn() * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in lora])

    detached = grad(lambda: world.velocity(x, t, cond, g, detach_uncond=True))
    cond_only = grad(lambda: g * world.velocity(x, t, cond, 1.0))
    assert relative_error(detached, cond_only) < 1e-5, "the unconditional branch leaks gradient"
    both = grad(lambda: world.velocity(x, t, cond, g))
    assert relative_error(both, cond_only) > 1e-3, "without detach both branches must carry gradient"


def test_precomputed_prompt_encodings_equal_the_encoders_output_and_free_them():
    """--text-encoders precompute: every train and held-out prompt encoded once, the encoders dropped, and the
    same encodings as the resident encoders give; a prompt outside both lists is refused by name."""
    resident = tiny_world(prompts=(PROMPTS, None), text_encoders="resident")
    pre = tiny_world(prompts=(PROMPTS, None), text_encoders="precompute")
    a = resident.encode(PROMPTS[::-1])
    b = pre.encode(PROMPTS[::-1])
    assert a.keys() == b.keys() and all(relative_error(b[k], a[k]) < 1e-5 for k in a), "encodings differ"
    assert pre.pipe.text_encoder_3 is None and not pre.text_encoders, "the encoders were not freed"
    with pytest.raises(ValueError, match="not among the precomputed"):
        pre.encode(["a prompt never seen"])
    assert tiny_world(text_encoders="auto").text_mode == "precompute", "auto must precompute what fits in memory"


def test_saved_lora_loads_into_a_fresh_pipeline_and_reproduces_the_velocity(world, tmp_path):
    """save_lora then load_lora_weights into a fresh pipeline gives the trained transformer's velocity."""
    add_lora(world.transformer)
    x, t = torch.randn(2, *world.latent_shape), torch.tensor([0.8, 0.4])
    with torch.no_grad():
        cond = world.encode(PROMPTS)
        trained = world.velocity(x, t, cond, 4.5)
        world.transformer.disable_adapters()
        base = world.velocity(x, t, cond, 4.5)
    assert (trained - base).abs().max() > 1e-3, "the test LoRA does not change the output"
    files.save_lora(world.transformer, tmp_path)
    fresh = tiny_pipe()  # same seed: the same base weights
    fresh.load_lora_weights(tmp_path)
    with torch.no_grad():
        loaded = sd3.SD3World(fresh, "cpu", dtype=torch.float32, resolution=8).velocity(x, t, cond, 4.5)
    assert relative_error(loaded, trained) < 1e-5, "reloaded LoRA differs: lost weights or lost lora_alpha scale"


def test_a_saved_pipeline_folder_loads_as_a_world(tmp_path):
    """SD3World.load of a save_pretrained folder gives the same velocity as the pipeline it came from."""
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path)
    a, b = tiny_world(), sd3.SD3World.load(str(tmp_path), "cpu", dtype=torch.float32, resolution=8)
    x, t = torch.randn(1, *a.latent_shape), torch.tensor([0.5])
    with torch.no_grad():
        loaded = b.velocity(x, t, b.encode(PROMPTS[:1]), 4.5)
        assert relative_error(loaded, a.velocity(x, t, a.encode(PROMPTS[:1]), 4.5)) < 1e-5, "the folder loads another"


@pytest.mark.parametrize("name", ["nobody/no-such-sd3-model", "/no/such/folder"])
def test_a_missing_model_fails_within_seconds_naming_the_model_flag(name):
    """SD3World.load of an uncached hub id or a missing folder raises LoadError naming --model, in < 10 s."""
    start = time.perf_counter()
    with pytest.raises(files.LoadError, match="--model") as err:
        sd3.SD3World.load(name, "cpu")
    assert time.perf_counter() - start < 10, "a failed load must not retry the hub for a minute"
    assert name in str(err.value)


def test_hub_problems_are_explained(monkeypatch):
    """Offline, gated and unreachable hubs each get their own advice (licence + login, network, local folder)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    assert "HF_HUB_OFFLINE" in files._hub_problem("a/b", folder_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda name, timeout: types.SimpleNamespace(gated="auto"))
    gated = errors.GatedRepoError.__new__(errors.GatedRepoError, "gated")  # its __init__ wants an HTTP response

    def refuse(name):
        raise gated
    monkeypatch.setattr(huggingface_hub, "auth_check", refuse)
    message = files._hub_problem("stabilityai/stable-diffusion-3.5-medium", folder_ok=True)
    assert "licence" in message and "hf auth login" in message and "local folder" in message

    def unreachable(name, timeout):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    message = files._hub_problem("yuvalkirstain/PickScore_v1", folder_ok=False)
    assert "cannot be reached" in message and "local folder" not in message


# ---------------------------------------------------------------- prompts

def test_read_prompts_names_the_flag_and_path_for_a_missing_or_empty_file(tmp_path):
    """read_prompts: a missing or blank file is a LoadError naming --prompts and the path."""
    missing, blank = tmp_path / "missing.txt", tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    for path in (missing, blank):
        with pytest.raises(files.LoadError, match="--prompts") as err:
            files.read_prompts(path)
        assert str(path) in str(err.value)
    (tmp_path / "ok.txt").write_text("a photo of a cat\n\n a photo of a dog \n")
    assert files.read_prompts(tmp_path / "ok.txt") == ["a photo of a cat", "a photo of a dog"]


def test_built_in_prompt_splits_are_disjoint_and_used_by_default(world):
    """The built-in GenEval-style train and held-out prompts do not overlap; prompts=(train, held_out) replace them."""
    train, held_out = files.read_prompts(sd3.TRAIN_PROMPTS), files.read_prompts(sd3.EVAL_PROMPTS)
    assert len(train) >= 90 and len(held_out) >= 25
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out), "duplicate prompts"
    assert not set(train) & set(held_out), "a held-out prompt is also a training prompt"
    assert world.train_prompts == train and world.eval_prompts == held_out
    assert tiny_world(prompts=(["a cat"], None)).train_prompts == ["a cat"]
    replaced = tiny_world(prompts=(None, ["a dog"]))
    assert replaced.train_prompts == train and replaced.eval_prompts == ["a dog"], "each split replaces its own"


# ---------------------------------------------------------------- train.py on SD3 (the paper's path)

def tiny_pickscore(device):
    """clip_scorers.PickScore over the tiny random CLIP; its seeding leaves the global RNG (the LoRA init) alone."""
    with torch.random.fork_rng():
        return clip_scorers.PickScore(*tiny_clip()).to(device)


def test_two_sd3_pickscore_iterations_train_only_the_lora_and_save_a_loadable_one(tmp_path, monkeypatch):
    """train.main on a saved tiny SD3 pipeline with PickScore: finite losses, first ratio 1, every LoRA tensor
    changed, base weights untouched, and out/lora loads into a fresh pipeline with the trained velocity."""
    folder = str(tmp_path / "pipe")
    tiny_pipe().to(torch.bfloat16).save_pretrained(folder)  # bf16 on disk: the world's bf16 load is then exact
    monkeypatch.setitem(rewards.REWARDS, "tiny_pickscore", tiny_pickscore)
    kept, build_world = {}, runs.build_world

    def build_and_keep(cfg, device):  # the world train.main builds, and its LoRA as initialised
        world = kept["world"] = build_world(cfg, device)
        add_adapter = world.transformer.add_adapter

        def add_and_record(config):
            add_adapter(config)
            kept["init"] = {k: v.clone() for k, v in get_peft_model_state_dict(world.transformer).items()}
        world.transformer.add_adapter = add_and_record
        return world
    monkeypatch.setattr(runs, "build_world", build_and_keep)
    cfg = dataclasses.replace(config.sd35(config.Config()), model=folder, reward="tiny_pickscore", resolution=8,
                              steps=2, prompts_per_step=2, group_size=2, num_steps=4, tweedie_substeps=2,
                              eval_steps=2, micro_batch=2, lora_rank=4, lora_alpha=8, out=str(tmp_path / "run"),
                              ema_decay=0.0)  # out/lora is then the live LoRA, which the reload compares with
    train.main(cfg)

    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [r["it"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows[:2]), "bad losses"
    assert all(r["ratio_first"] == 1.0 for r in rows[:2]), "re-scoring before the first update must give ratio 1"
    world = kept["world"]
    trained = get_peft_model_state_dict(world.transformer)
    unchanged = [k for k in kept["init"] if torch.equal(kept["init"][k].float(), trained[k])]
    assert unchanged == dead_ends(world.transformer), f"LoRA parameters never updated: {unchanged[:3]}"
    ckpt = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=False)["lora"]
    assert all(torch.equal(ckpt[k], v) for k, v in trained.items()), "the checkpoint is not the trained LoRA"
    base = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
    now = {k.replace(".base_layer", ""): v for k, v in world.transformer.state_dict().items() if "lora_" not in k}
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base), "a base weight changed"

    fresh = sd3.SD3World.load(folder, "cpu", resolution=8)
    fresh.pipe.load_lora_weights(os.path.join(cfg.out, "lora"))
    # compare in float32 (the bf16 base weights convert exactly): bf16 rounding inside the network, float32 LoRA path
    # in one model and bf16 in the other, would otherwise swamp a small LoRA effect
    for w in (world, fresh):
        w.transformer.float()
        w.dtype = torch.float32
    x, t = torch.randn(2, *world.latent_shape), torch.tensor([0.8, 0.4])
    with torch.no_grad():
        cond = {k: v.float() for k, v in world.encode(world.eval_prompts[:2]).items()}  # precomputed ones
        v_trained, v_loaded = world.velocity(x, t, cond, 4.5), fresh.velocity(x, t, cond, 4.5)
        with base_model(world.transformer):
            effect = (v_trained - world.velocity(x, t, cond, 4.5)).abs().max().item()
    err = (v_loaded - v_trained).abs().max().item()
    # the reloaded LoRA weights went through bf16 (the transformer's dtype on load): equal up to their rounding
    assert effect > 1e-4 and err <= 0.05 * effect, \
        f"reloaded LoRA differs by {err} (its effect: {effect}): lost weights or lost lora_alpha scale"


def test_train_main_fails_within_seconds_on_a_model_that_cannot_be_loaded(tmp_path):
    """--model no/such-model offline: train.main raises files.LoadError naming --model within seconds, no output."""
    cfg = dataclasses.replace(config.sd35(config.Config()), model="no/such-model", out=str(tmp_path / "run"))
    start = time.perf_counter()
    with pytest.raises(files.LoadError, match="--model") as err:
        train.main(cfg)
    assert time.perf_counter() - start < 10, "a failed load must not retry the hub for a minute"
    assert "no/such-model" in str(err.value) and not os.path.exists(cfg.out)


def test_every_text_encoder_flag_is_a_mode_the_world_acts_on(tmp_path):
    """Each --text-encoders value reaches SD3World through runs.build_world and is the mode it runs in (auto: the
    one memory allows); a mode the world does not know is refused, not silently read as `resident`."""
    folder = str(tmp_path / "pipe")
    tiny_pipe().save_pretrained(folder)
    for flag in config.TEXT_ENCODERS:
        cfg = dataclasses.replace(config.Config(), model=folder, resolution=8, text_encoders=flag)
        world = runs.build_world(cfg, "cpu")
        assert world.text_mode == ("precompute" if flag == "auto" else flag), f"--text-encoders {flag} was ignored"
    assert tiny_world(text_encoders="offload").text_encoders[0].device.type == "cpu"
    with pytest.raises(ValueError, match="text_encoders='gpu'"):
        tiny_world(text_encoders="gpu")

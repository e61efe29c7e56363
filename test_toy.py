"""Tests of the toy world: render.py (grammar, renderer, the GenEval-like detector) and toy.py (the base model,
its pretraining with caption noise, the shipped weights, ToyWorld).
"""
import random
import time

import pytest
import torch

import render
import toy
from conftest import relative_error
from world import World


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    return toy.ToyWorld("cpu", tmp_path_factory.mktemp("toy_cache"), pretrain_steps=20)


def renders(prompt: str, n: int = 32, seed: int = 0) -> torch.Tensor:
    return render.render_batch([prompt] * n, random.Random(seed))


def test_prompts_are_at_least_100_distinct_with_disjoint_splits():
    """The toy grammar gives >= 100 prompts; about 20% are held out and never trained on."""
    train, held = set(render.TRAIN_PROMPTS), set(render.EVAL_PROMPTS)
    assert len(train | held) >= 100, "fewer than 100 distinct prompts"
    assert len(train) == len(render.TRAIN_PROMPTS), "the training split repeats a prompt"
    assert len(held) == len(render.EVAL_PROMPTS), "the held-out split repeats a prompt"
    assert not train & held, "a held-out prompt leaks into training"
    assert 0.15 < len(held) / len(train | held) < 0.25
    assert render._split() == (render.TRAIN_PROMPTS, render.EVAL_PROMPTS), "the split is not deterministic"


def test_parse_reads_every_prompt_and_rejects_a_foreign_one_by_name():
    """parse inverts prompt_of on the whole grammar and names a prompt outside it."""
    for p in render.TRAIN_PROMPTS + render.EVAL_PROMPTS:
        assert render.prompt_of(render.parse(p)) == p
    for bad in ["a photo of a cat", "a red square left of a red circle", "four red squares"]:
        with pytest.raises(ValueError, match=bad):
            render.parse(bad)


def test_detector_scores_correct_renders_near_one():
    """Ground-truth renders of the held-out prompts score near 1 on average."""
    prompts = render.EVAL_PROMPTS * 4
    s = render.geneval_score(render.render_batch(prompts, random.Random(0)), prompts)
    assert s.dtype == torch.float32 and s.shape == (len(prompts),) and 0 <= s.min() and s.max() <= 1
    assert s.mean() > 0.85, f"correct renders score only {s.mean():.3f}: the detector is miscalibrated"


@pytest.mark.parametrize("truth, asked, most", [
    ("two red squares", "three red squares", 0.5),                             # count
    ("two red squares", "two blue squares", 0.5),                              # colour
    ("a green triangle left of a yellow circle", "a yellow circle left of a green triangle", 0.5),  # position
    ("a blue circle", "a blue square", 0.75),                                  # shape: a wrong one halves the credit
    ("a red triangle above a blue square", "a red circle above a blue square", 0.85),  # ... of one object of two
])
def test_detector_scores_mismatched_renders_clearly_lower(truth, asked, most):
    """Renders of one prompt scored against a prompt differing in one attribute score clearly lower."""
    x = renders(truth)
    right, wrong = render.geneval_score(x, [truth] * len(x)).mean(), render.geneval_score(x, [asked] * len(x)).mean()
    assert wrong < most * right, f"{truth!r} scored {wrong:.3f} as {asked!r} vs {right:.3f}: attribute not checked"


def test_detector_gives_graded_scores_on_blurry_images():
    """Blurred renders (like early Tweedie estimates) get partial, untied credit between 0 and the sharp score."""
    prompt = "two yellow circles"
    x = renders(prompt, n=64)
    blurred = [torch.nn.functional.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)[..., :16, :16] for k in (2, 3)]
    means = [render.geneval_score(b, [prompt] * 64).mean() for b in [x, *blurred]]
    assert means[0] > means[1] > means[2] > 0.01, f"scores {means} are not graded by sharpness"
    assert len(set(render.geneval_score(blurred[0], [prompt] * 64).tolist())) > 32, "rewards tie within a group"


def test_detector_barely_moves_under_invisible_noise():
    """Stepwise gains are differences of rewards of nearly equal images, so the detector must be smooth: pixel noise
    of std 0.02 (5 levels of 255) on blurred renders moves the reward by < 0.03 on average (thresholded blob
    statistics, the first detector's, moved it by 0.041; the soft-weighted ones by 0.021)."""
    torch.manual_seed(0)
    prompts = (render.EVAL_PROMPTS * 3)[:128]
    x = torch.nn.functional.avg_pool2d(render.render_batch(prompts, random.Random(0)), 2, 1, 1,
                                       count_include_pad=False)[..., :16, :16]
    r = render.geneval_score(x, prompts)
    noisy = lambda: (x + 0.02 * torch.randn_like(x)).clamp(0, 1)
    moved = torch.stack([render.geneval_score(noisy(), prompts) - r for _ in range(4)])
    assert moved.abs().mean() < 0.03, f"invisible noise moves the reward by {moved.abs().mean():.3f} on average"


def test_world_has_the_world_contract(toy_world):
    """A world.World: shapes, frozen weights and the fields train.py reads."""
    assert isinstance(toy_world, World)
    assert toy_world.latent_shape == (3, 16, 16) and toy_world.default_guidance == 1.0
    assert toy_world.eval_prompts == render.EVAL_PROMPTS and toy_world.train_prompts == render.TRAIN_PROMPTS
    assert not any(p.requires_grad for p in toy_world.transformer.parameters()), "base weights must be frozen"
    cond = toy_world.encode(toy_world.eval_prompts[:3])
    x, t = torch.randn(3, *toy_world.latent_shape), torch.rand(3)
    v = toy_world.velocity(x, t, cond, 1.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    img = toy_world.decode(x)
    assert img.min() >= 0 and img.max() <= 1


def test_cache_round_trips_to_the_same_velocity(toy_world, tmp_path):
    """A second construction loads the cached weights (text embeddings included) and gives the identical velocity."""
    start = time.perf_counter()
    again = toy.ToyWorld("cpu", toy_world.cache_path.parent, pretrain_steps=20)
    assert time.perf_counter() - start < 5, "the second construction pretrained again instead of loading the cache"
    prompts = toy_world.eval_prompts[:4]
    x, t = torch.randn(4, *toy_world.latent_shape), torch.rand(4)
    with torch.no_grad():
        v = toy_world.velocity(x, t, toy_world.encode(prompts), 1.0)
        v_again = again.velocity(x, t, again.encode(prompts), 1.0)
    assert torch.equal(v, v_again), "the cache lost weights (the text embeddings?)"
    assert len(list(toy_world.cache_path.parent.glob("*.safetensors"))) == 1


def test_velocity_with_guidance_is_the_cfg_combination(toy_world):
    """velocity(g) = v_u + g (v_c - v_u), with v_u the empty prompt's velocity."""
    prompts = toy_world.eval_prompts[:4]
    cond, empty = toy_world.encode(prompts), toy_world.encode([""] * 4)
    x, t = torch.randn(4, *toy_world.latent_shape), torch.rand(4)
    with torch.no_grad():
        v_c, v_u = toy_world.velocity(x, t, cond, 1.0), toy_world.velocity(x, t, empty, 1.0)
        v_g = toy_world.velocity(x, t, cond, 3.0)
    assert relative_error(v_g, v_u + 3.0 * (v_c - v_u)) < 1e-5, "CFG is not v_u + g (v_c - v_u)"


def test_encode_rejects_a_prompt_outside_the_toy_grammar(toy_world):
    """A --prompts file with a foreign prompt fails at encode, naming it."""
    with pytest.raises(ValueError, match="a photo of a cat"):
        toy_world.encode(["a photo of a cat"])


def test_lora_gradient_reaches_the_adapter_only(tmp_path):
    """With a peft LoRA adapter on the attention projections, backward through velocity reaches only LoRA weights."""
    from peft import LoraConfig
    w = toy.ToyWorld("cpu", tmp_path, pretrain_steps=2)
    w.transformer.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    trainable = {n for n, p in w.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable), "only the adapter may be trainable"
    cond = w.encode(w.train_prompts[:2])
    w.velocity(torch.randn(2, *w.latent_shape), torch.rand(2), cond, 2.0).square().mean().backward()
    grads = {n for n, p in w.transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable, "the gradient missed the adapter or reached frozen weights"
    assert any("lora_B" in n for n in grads)


def euler_sample(toy_world, prompts, guidance, T=10, shift=3.0, seed=0):
    s = torch.linspace(1, 0, T + 1)
    sigmas = shift * s / (1 + (shift - 1) * s)  # SD3's shifted schedule (METHOD §1)
    x = torch.randn(len(prompts), *toy_world.latent_shape, generator=torch.Generator().manual_seed(seed))
    cond = toy_world.encode(prompts)
    with torch.no_grad():
        for t, s in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s - t) * toy_world.velocity(x, t.expand(len(prompts)), cond, guidance)
    return toy_world.decode(x)


@pytest.mark.slow
def test_default_base_model_leaves_room_for_rl_and_improves_with_guidance(tmp_path):
    """The default base scores 0.15-0.5 on held-out prompts at guidance 1 (T=10 Euler ODE), more at guidance 3."""
    toy_world = toy.ToyWorld("cpu", tmp_path)
    prompts = toy_world.eval_prompts * 6  # 300 samples
    g1, g3 = (render.geneval_score(euler_sample(toy_world, prompts, g), prompts).mean().item() for g in (1.0, 3.0))
    assert 0.15 < g1 < 0.5, f"base held-out score {g1:.3f} at guidance 1: retune pretraining (steps, lr)"
    assert g3 > g1, f"guidance 3 ({g3:.3f}) does not beat guidance 1 ({g1:.3f}): CFG dropout is broken"


def attributes(spec: render.Spec) -> list:
    """The attributes a caption can get wrong, one entry each: per object colour, shape, count."""
    return [value for o in spec.objects for value in o]


def test_shipped_base_was_made_by_the_current_configuration():
    """The shipped weights' stored config key is the current one: a config change must regenerate the file."""
    assert toy.stored_key(toy.SHIPPED) == toy.config_key(), (
        f"{toy.SHIPPED} was pretrained under another configuration (model, PRETRAIN, steps, vocabulary, split or "
        "renderer changed): run `python toy.py --pretrain` and commit the new file")


def test_default_world_loads_the_shipped_base_without_pretraining(tmp_path):
    """ToyWorld with default arguments loads the shipped file in seconds and writes nothing to its cache."""
    start = time.perf_counter()
    world = toy.ToyWorld("cpu", tmp_path)
    assert time.perf_counter() - start < 5, "the default world pretrained instead of loading the shipped base"
    assert world.cache_path == toy.SHIPPED and not list(tmp_path.iterdir()), "the shipped base was not used"


def test_shipped_base_renders_cleanly_but_follows_prompts_imperfectly():
    """32 held-out samples (guidance 1, 10-step ODE) of the shipped base: render quality high, adherence in a band
    with room for RL. Measured on this sample: render quality 0.81, adherence 0.49 (per-sample std 0.17 and 0.31);
    the bounds sit ~3 standard errors of a 32-sample mean away (0.03 and 0.055)."""
    world = toy.ToyWorld("cpu")
    prompts = render.EVAL_PROMPTS[::3] + render.EVAL_PROMPTS[1::3][:15]  # 32 prompts, counting and relational
    adherence, quality = toy.base_scores(world, prompts, steps=10)
    assert quality.mean() > 0.7, f"render quality {quality.mean():.3f}: the base renders blotches, not shapes"
    assert 0.3 < adherence.mean() < 0.65, (
        f"adherence {adherence.mean():.3f}: outside the band where RL has room (caption noise too strong or weak)")


def test_miscaption_changes_exactly_one_attribute_and_stays_in_the_grammar():
    """Every prompt's miscaption parses, and differs from it in one colour, shape or count, or is its swap."""
    rng = random.Random(0)
    kinds = set()
    for prompt in render.ALL_PROMPTS:
        for _ in range(4):
            wrong = toy.miscaption(prompt, rng)
            truth = render.parse(prompt)
            spec = render.parse(wrong)  # raises if the caption left the grammar
            if spec.objects == truth.objects[::-1] and spec.relation == truth.relation and spec.relation:
                kinds.add("swap")
                continue
            changed = [i for i, (a, b) in enumerate(zip(attributes(truth), attributes(spec))) if a != b]
            assert len(changed) == 1 and spec.relation == truth.relation, (
                f"{prompt!r} -> {wrong!r}: a miscaption must change exactly one attribute")
            kinds.add(("colour", "shape", "count")[changed[0] % 3])
    assert kinds == {"colour", "shape", "count", "swap"}, f"only {kinds} ever get miscaptioned"


def test_pretraining_captions_are_wrong_and_empty_at_the_configured_rates():
    """captions() miscaptions PRETRAIN['miscaption'] of the prompts and empties PRETRAIN['drop'] of them."""
    prompts = random.Random(1).choices(render.TRAIN_PROMPTS, k=4000)
    read = toy.captions(prompts, random.Random(2))
    empty = sum(c == "" for c in read) / len(read)
    wrong = sum(c not in ("", p) for p, c in zip(prompts, read)) / len(read)
    expected = toy.PRETRAIN["miscaption"] * (1 - toy.PRETRAIN["drop"])
    assert abs(empty - toy.PRETRAIN["drop"]) < 0.03, f"{empty:.3f} of captions empty: CFG dropout rate is wrong"
    assert abs(wrong - expected) < 0.03, f"{wrong:.3f} of captions wrong, expected {expected:.3f}: noise rate"


def test_text_encoder_tells_a_relation_from_its_swap():
    """The text encoder is order-aware: a relation and its swap (the same words) encode differently."""
    world = toy.ToyWorld("cpu")
    emb = world.encode(["a red square left of a blue circle", "a blue circle left of a red square"])["prompt_embeds"]
    assert not torch.allclose(emb[0], emb[1]), "swapped relations encode alike: a bag of words loses the order"


def test_render_quality_is_the_best_score_over_all_prompts():
    """render_quality (batched over prompts) equals the max of geneval_score over ALL_PROMPTS, one prompt a call."""
    images = render.render_batch(render.EVAL_PROMPTS[:6], random.Random(0))
    images = torch.cat([images, torch.rand(2, *images.shape[1:])])  # and two images of nothing
    brute = torch.stack([render.geneval_score(images, [p] * len(images)) for p in render.ALL_PROMPTS]).amax(0)
    assert relative_error(render.render_quality(images), brute) < 1e-5, "batched scoring differs from one by one"


def test_a_clean_render_of_another_prompt_has_high_render_quality_but_low_adherence():
    """Renders of prompt A asked as prompt B: low adherence, render quality ~1 and never below the adherence."""
    shown = render.EVAL_PROMPTS * 2
    asked = shown[7:] + shown[:7]  # every image asked for another prompt
    images = render.render_batch(shown, random.Random(0))
    adherence = render.geneval_score(images, asked)
    quality = render.render_quality(images)
    assert quality.mean() > 0.85, f"clean renders have render quality {quality.mean():.3f}: it must be near 1"
    assert adherence.mean() < 0.5, f"adherence {adherence.mean():.3f} to other prompts: not prompt-specific"
    assert (quality >= adherence - 1e-6).all(), "render quality is a max over prompts: never below the adherence"


def test_a_training_prompt_file_replaces_the_split_and_must_hold_prompts_of_the_grammar(tmp_path):
    """ToyWorld(prompts=(train, None)) trains on them; runs.build_world refuses a file holding a foreign prompt, naming
    --prompts, the file and the prompt."""
    import config
    import files
    import runs

    world = toy.ToyWorld("cpu", prompts=(["two red squares", "a blue circle"], None))
    assert world.train_prompts == ["two red squares", "a blue circle"] and world.eval_prompts == render.EVAL_PROMPTS
    path = tmp_path / "prompts.txt"
    path.write_text("two red squares\na photo of a cat\n")
    with pytest.raises(files.LoadError, match=f"--prompts {path}: prompt 'a photo of a cat' is not in the toy"):
        runs.build_world(config.Config(prompts=str(path)), "cpu")

"""Tests of toy.py: prompts, renderer, GenEval-like detector, the ToyWorld contract (INTERFACE.md)."""
import random
import time

import pytest
import torch

import toy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.ToyWorld("cpu", tmp_path_factory.mktemp("toy_cache"), pretrain_steps=20)


def render(prompt: str, n: int = 32, seed: int = 0) -> torch.Tensor:
    return toy.render_batch([prompt] * n, random.Random(seed))


def test_prompts_are_at_least_100_distinct_with_disjoint_splits():
    """The toy grammar gives >= 100 prompts; about 20% are held out and never trained on."""
    train, held = set(toy.TRAIN_PROMPTS), set(toy.EVAL_PROMPTS)
    assert len(train | held) >= 100 and len(train) == len(toy.TRAIN_PROMPTS) and len(held) == len(toy.EVAL_PROMPTS)
    assert not train & held, "a held-out prompt leaks into training"
    assert 0.15 < len(held) / len(train | held) < 0.25
    assert toy._split() == (toy.TRAIN_PROMPTS, toy.EVAL_PROMPTS), "the split is not deterministic"


def test_parse_reads_every_prompt_and_rejects_a_foreign_one_by_name():
    """parse inverts prompt_of on the whole grammar and names a prompt outside it."""
    for p in toy.TRAIN_PROMPTS + toy.EVAL_PROMPTS:
        assert toy.prompt_of(toy.parse(p)) == p
    for bad in ["a photo of a cat", "a red square left of a red circle", "four red squares"]:
        with pytest.raises(ValueError, match=bad):
            toy.parse(bad)


def test_detector_scores_correct_renders_near_one():
    """Ground-truth renders of the held-out prompts score near 1 on average."""
    prompts = toy.EVAL_PROMPTS * 4
    s = toy.geneval_score(toy.render_batch(prompts, random.Random(0)), prompts)
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
    x = render(truth)
    right, wrong = toy.geneval_score(x, [truth] * len(x)).mean(), toy.geneval_score(x, [asked] * len(x)).mean()
    assert wrong < most * right, f"{truth!r} scored {wrong:.3f} as {asked!r} vs {right:.3f}: attribute not checked"


def test_detector_gives_graded_scores_on_blurry_images():
    """Blurred renders (like early Tweedie estimates) get partial, untied credit between 0 and the sharp score."""
    prompt = "two yellow circles"
    x = render(prompt, n=64)
    blurred = [torch.nn.functional.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)[..., :16, :16] for k in (2, 3)]
    means = [toy.geneval_score(b, [prompt] * 64).mean() for b in [x, *blurred]]
    assert means[0] > means[1] > means[2] > 0.01, f"scores {means} are not graded by sharpness"
    assert len(set(toy.geneval_score(blurred[0], [prompt] * 64).tolist())) > 32, "rewards tie within a group"


def test_world_has_the_world_contract(world):
    """Shapes, frozen weights and the fields train.py reads."""
    assert world.latent_shape == (3, 16, 16) and world.default_guidance == 1.0
    assert world.eval_prompts == toy.EVAL_PROMPTS and world.train_prompts == toy.TRAIN_PROMPTS
    assert not any(p.requires_grad for p in world.transformer.parameters()), "base weights must be frozen"
    cond = world.encode(world.eval_prompts[:3])
    x, t = torch.randn(3, *world.latent_shape), torch.rand(3)
    v = world.velocity(x, t, cond, 1.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    img = world.decode(x)
    assert img.min() >= 0 and img.max() <= 1


def test_cache_round_trips_to_the_same_velocity(world, tmp_path):
    """A second construction loads the cached weights (text embeddings included) and gives the identical velocity."""
    start = time.perf_counter()
    again = toy.ToyWorld("cpu", world.cache_path.parent, pretrain_steps=20)
    assert time.perf_counter() - start < 5, "the second construction pretrained again instead of loading the cache"
    prompts = world.eval_prompts[:4]
    x, t = torch.randn(4, *world.latent_shape), torch.rand(4)
    with torch.no_grad():
        v, v_again = world.velocity(x, t, world.encode(prompts), 1.0), again.velocity(x, t, again.encode(prompts), 1.0)
    assert torch.equal(v, v_again), "the cache lost weights (the text embeddings?)"
    assert len(list(world.cache_path.parent.glob("*.safetensors"))) == 1


def test_velocity_with_guidance_is_the_cfg_combination(world):
    """velocity(g) = v_u + g (v_c - v_u), with v_u the empty prompt's velocity."""
    prompts = world.eval_prompts[:4]
    cond, empty = world.encode(prompts), world.encode([""] * 4)
    x, t = torch.randn(4, *world.latent_shape), torch.rand(4)
    with torch.no_grad():
        v_c, v_u = world.velocity(x, t, cond, 1.0), world.velocity(x, t, empty, 1.0)
        v_g = world.velocity(x, t, cond, 3.0)
    torch.testing.assert_close(v_g, v_u + 3.0 * (v_c - v_u), atol=1e-5, rtol=1e-4)


def test_encode_rejects_a_prompt_outside_the_toy_grammar(world):
    """A --prompts file with a foreign prompt fails at encode, naming it."""
    with pytest.raises(ValueError, match="a photo of a cat"):
        world.encode(["a photo of a cat"])


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


def euler_sample(world, prompts, guidance, T=10, shift=3.0, seed=0):
    s = torch.linspace(1, 0, T + 1)
    sigmas = shift * s / (1 + (shift - 1) * s)  # SD3's shifted schedule (METHOD §1)
    x = torch.randn(len(prompts), *world.latent_shape, generator=torch.Generator().manual_seed(seed))
    cond = world.encode(prompts)
    with torch.no_grad():
        for t, s in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s - t) * world.velocity(x, t.expand(len(prompts)), cond, guidance)
    return world.decode(x)


@pytest.mark.slow
def test_default_base_model_leaves_room_for_rl_and_improves_with_guidance(tmp_path):
    """The default base scores 0.15-0.5 on held-out prompts at guidance 1 (T=10 Euler ODE), more at guidance 3."""
    world = toy.ToyWorld("cpu", tmp_path)
    prompts = world.eval_prompts * 6  # 300 samples
    g1, g3 = (toy.geneval_score(euler_sample(world, prompts, g), prompts).mean().item() for g in (1.0, 3.0))
    assert 0.15 < g1 < 0.5, f"base held-out score {g1:.3f} at guidance 1: retune pretraining (steps, lr)"
    assert g3 > g1, f"guidance 3 ({g3:.3f}) does not beat guidance 1 ({g1:.3f}): CFG dropout is broken"

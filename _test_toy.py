"""Tests of toy.py: prompts, renderer, GenEval-like detector, the ToyWorld contract (INTERFACE.md)."""
import random

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


@pytest.mark.parametrize("truth, asked", [
    ("two red squares", "three red squares"),                                  # count
    ("two red squares", "two blue squares"),                                   # colour
    ("a blue circle", "a blue square"),                                        # shape
    ("a green triangle left of a yellow circle", "a yellow circle left of a green triangle"),  # position
])
def test_detector_scores_mismatched_renders_clearly_lower(truth, asked):
    """Renders of one prompt scored against a prompt differing in one attribute score clearly lower."""
    x = render(truth)
    right, wrong = toy.geneval_score(x, [truth] * len(x)).mean(), toy.geneval_score(x, [asked] * len(x)).mean()
    assert wrong < 0.5 * right, f"{truth!r} scored {wrong:.3f} as {asked!r} vs {right:.3f}: attribute not checked"


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
    again = toy.ToyWorld("cpu", world.cache_path.parent, pretrain_steps=20)
    prompts = world.eval_prompts[:4]
    x, t = torch.randn(4, *world.latent_shape), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(world.velocity(x, t, world.encode(prompts), 1.0), again.velocity(x, t, again.encode(prompts), 1.0))
    assert len(list(world.cache_path.parent.glob("*.safetensors"))) == 1


def test_velocity_with_guidance_is_the_cfg_combination(world):
    """velocity(g) = v_u + g (v_c - v_u), with v_u the empty prompt's velocity."""
    prompts = world.eval_prompts[:4]
    cond, empty = world.encode(prompts), world.encode([""] * 4)
    x, t = torch.randn(4, *world.latent_shape), torch.rand(4)
    with torch.no_grad():
        v_c, v_u, v_g = world.velocity(x, t, cond, 1.0), world.velocity(x, t, empty, 1.0), world.velocity(x, t, cond, 3.0)
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

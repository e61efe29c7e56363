"""SD3World: Stable Diffusion 3 / 3.5 as a world.World: the paper's setup (choice 16).

Wraps a diffusers StableDiffusion3Pipeline. encode: the pipeline's own encode_prompt (CLIP-L, CLIP-G, T5).
velocity: one SD3Transformer2DModel forward, v ~ x1 - x0 at timestep 1000 t (METHOD.md §1), with classifier-free
guidance from one doubled batch as the pipeline computes it (world.guided). decode: the VAE. Also the built-in
GenEval-style prompt splits (prompts/*.txt); loading goes through files.hub_load, which fails fast.

Notation: x -> x_t (B, C, H, W) latents; t -> t (B,) in [0, 1], 1 = noise; v -> v_theta(x_t, t, c);
guidance -> g, CFG v = v_u + g (v_c - v_u) with v_u the empty prompt's velocity.

Choices (METHOD.md §7): 18 (T5's 128 tokens), 19 (the VAE in float32), 20 (the empty prompt as CFG's negative,
encoded once), 21 (--text-encoders: the ~11 GB of text encoders never travel between CPU and GPU each iteration).
"""
import os
from collections import OrderedDict

import torch

from batching import chunks
from files import hub_load, quiet_image_processors, read_prompts
from world import guided

quiet_image_processors()  # before diffusers' pipelines import transformers' image processors
from diffusers import StableDiffusion3Pipeline  # noqa: E402

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
TRAIN_PROMPTS = os.path.join(PROMPT_DIR, "geneval_train.txt")
EVAL_PROMPTS = os.path.join(PROMPT_DIR, "geneval_eval.txt")
MAX_SEQUENCE_LENGTH = 128  # T5 tokens (choice 18)
CACHE_SIZE = 1024  # prompts whose encodings stay on the device: ~1.7 MB each for SD3.5 in bf16
DECODE_CHUNK = 16  # images per VAE decode: 512 px activations of a whole rollout batch at once do not fit
PRECOMPUTE_GB = 8.0  # RAM the precomputed prompt encodings may take (choice 21)
TEXT_MODES = ("precompute", "resident", "offload")  # what --text-encoders can ask for besides auto (choice 21)
HEADROOM_GB = 30.0  # GPU memory that training needs beside resident text encoders (choice 21)


class SD3World:
    """world.World on a StableDiffusion3Pipeline; base weights frozen, the LoRA is train.py's (lora.py)."""

    default_guidance = 4.5

    def __init__(self, pipe, device, dtype=torch.bfloat16, prompts=(None, None), gradient_checkpointing=False,
                 text_encoders="auto", resolution=512):
        """prompts: (training, held-out) lists replacing the built-in splits where not None."""
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.transformer = pipe.transformer.to(self.device, dtype)
        pipe.vae.to(self.device, torch.float32)  # choice 19
        encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        self.text_encoders = [m for m in encoders if m is not None]
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        multiple = pipe.vae_scale_factor * pipe.patch_size
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of {multiple} (VAE factor x patch size)")
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (self.transformer.config.in_channels, side, side)
        train, held_out = prompts
        self.train_prompts = list(train) if train is not None else read_prompts(TRAIN_PROMPTS)
        self.eval_prompts = list(held_out) if held_out is not None else read_prompts(EVAL_PROMPTS)
        self._cache = OrderedDict()  # prompt -> its encoding rows, least recently used first
        self._negative = None  # the empty prompt's encoding rows (choice 20)
        self.text_mode = self._text_mode(text_encoders)
        for module in self.text_encoders:
            module.to("cpu" if self.text_mode == "offload" else self.device, dtype)

    def _text_mode(self, asked):
        """The text encoders' mode (choice 21): `asked`, or for `auto` the first that memory allows of precompute (the
        encodings of every prompt in PRECOMPUTE_GB of RAM), resident (the GPU has room beside them), offload."""
        if asked not in TEXT_MODES + ("auto",):
            raise ValueError(f"text_encoders={asked!r}: must be auto or one of {', '.join(TEXT_MODES)}")
        if asked != "auto":
            return asked
        config = self.transformer.config
        per_prompt = (77 + MAX_SEQUENCE_LENGTH) * config.joint_attention_dim * 2 + config.pooled_projection_dim * 2
        if (len(self.train_prompts) + len(self.eval_prompts) + 1) * per_prompt <= PRECOMPUTE_GB * 1e9:
            return "precompute"
        if self.device.type != "cuda":
            return "resident"
        need = sum(p.numel() * 2 for m in self.text_encoders for p in m.parameters()) + HEADROOM_GB * 1e9
        return "resident" if torch.cuda.mem_get_info(self.device)[0] >= need else "offload"

    def _precompute(self):
        """Encode every training and held-out prompt once, keep the rows on the CPU, free the encoders."""
        prompts = list(dict.fromkeys(self.train_prompts + self.eval_prompts))
        rows = []
        for c in chunks(len(prompts), 64):
            rows += [{k: v.cpu() for k, v in r.items()} for r in self._text_encode(prompts[c])]
        self._negative = self._text_encode([""])[0]
        self._cache.update(zip(prompts, rows))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            setattr(self.pipe, name, None)
        self.text_encoders = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @classmethod
    def load(cls, model, device, dtype=torch.bfloat16, **kwargs):
        """From a hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a local folder; LoadError naming --model."""
        pipe = hub_load(lambda name, **kw: StableDiffusion3Pipeline.from_pretrained(name, dtype=dtype, **kw),
                        model, "--model")
        return cls(pipe, device, dtype, **kwargs)

    @torch.no_grad()
    def encode(self, prompts):
        """Batch-first prompt_embeds, pooled_prompt_embeds and their negative_ twins (the empty prompt) for CFG."""
        if self.text_mode == "precompute" and self._negative is None:
            self._precompute()
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new and self.text_mode == "precompute":
            raise ValueError(f"prompt {new[0]!r} was not among the precomputed train and held-out prompts")
        if new or self._negative is None:
            rows = self._text_encode(new + [""] * (self._negative is None))
            if self._negative is None:
                self._negative = rows.pop()
            self._cache.update(zip(new, rows))
        for p in prompts:
            self._cache.move_to_end(p)
        cond = {k: torch.stack([self._cache[p][k] for p in prompts]).to(self.device) for k in self._negative}
        # a view: every row shares the one copy of the empty prompt's encoding
        cond.update({"negative_" + k: v.expand(len(prompts), *v.shape) for k, v in self._negative.items()})
        while len(self._cache) > CACHE_SIZE and self.text_mode != "precompute":
            self._cache.popitem(last=False)
        return cond

    def _text_encode(self, prompts):
        """One encoding dict per prompt, from the pipeline's encode_prompt on the device (choice 21)."""
        offload = self.text_mode == "offload"
        if offload:
            for module in self.text_encoders:
                module.to(self.device)
        try:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
        finally:
            if offload:
                for module in self.text_encoders:
                    module.to("cpu")
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(embeds, pooled)]

    def velocity(self, x, t, cond, guidance, detach_uncond=False):
        """v_theta(x_t, t, c) in float32; guidance g != 1: v_u + g (v_c - v_u) from one batch [uncond; cond]."""
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        if guidance != 1:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
        v = self.transformer(hidden_states=x.to(self.dtype), timestep=1000 * t, encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0].float()
        if guidance == 1:
            return v
        v_u, v_c = v.chunk(2)
        return guided(v_u, v_c, guidance, detach_uncond)

    @torch.no_grad()
    def decode(self, x0):
        """(B, 3, H, W) float32 images in [0, 1]: the VAE undoes SD3's latent scaling and shift first."""
        vae = self.pipe.vae
        images = [vae.decode(z.float() / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
                  for z in x0.split(DECODE_CHUNK)]
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

"""SD3World: Stable Diffusion 3 / 3.5 as a stepgrpo world (INTERFACE.md), the paper's setup (METHOD.md §5).

Wraps a diffusers StableDiffusion3Pipeline. encode: the pipeline's own encode_prompt (CLIP-L, CLIP-G, T5).
velocity: one SD3Transformer2DModel forward, v ~ x1 - x0 at timestep 1000 t (METHOD §1), with classifier-free
guidance from one doubled batch as the pipeline computes it. decode: the VAE. Also the built-in GenEval-style
prompt splits (prompts/*.txt), read_prompts, save_lora, and hub_load / LoadError, the fail-fast loading that
rewards.py shares.

Notation: x -> x_t (B, C, H, W) latents; t -> t (B,) in [0, 1], 1 = noise; v -> v_theta(x_t, t, c);
guidance -> g, CFG v = v_u + g (v_c - v_u) with v_u the empty prompt's velocity.

Choices (where the paper is silent, Flow-GRPO's):
1. T5 context of 128 tokens, as Flow-GRPO encodes prompts (the pipeline's default is 256): shorter joint attention.
2. VAE in float32, as Flow-GRPO: it is small (~84M parameters), so the images the reward scores cost no precision.
3. The CFG negative is the empty prompt, encoded once.
4. Text encoders wait on the CPU and visit the GPU only to encode prompts not yet cached (T5-XXL is ~9 GB in bf16).
"""
import os
from collections import OrderedDict

import torch
from diffusers import StableDiffusion3Pipeline

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
TRAIN_PROMPTS = os.path.join(PROMPT_DIR, "geneval_train.txt")
EVAL_PROMPTS = os.path.join(PROMPT_DIR, "geneval_eval.txt")
MAX_SEQUENCE_LENGTH = 128  # T5 tokens (CHOICE 1)
CACHE_SIZE = 1024  # prompts whose encodings stay on the device: ~1.7 MB each for SD3.5 in bf16
DECODE_CHUNK = 16  # images per VAE decode: 512 px activations of a whole rollout batch at once do not fit


class LoadError(RuntimeError):
    """A model, reward or prompt file that cannot be loaded; the message names the flag and what to do."""


def read_prompts(path):
    """The prompts of a text file, one a line, blank lines skipped; missing or empty is a LoadError naming --prompts."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise LoadError(f"--prompts {path}: cannot read the file ({e.strerror}); give a text file, one prompt a line") from e
    if not prompts:
        raise LoadError(f"--prompts {path}: the file holds no prompts; give a text file, one prompt a line")
    return prompts


def hub_load(load, name, flag, folder_ok=True):
    """load(name, **kwargs) from a local folder or a hub id, or a LoadError within seconds saying why and what to do.

    A plain from_pretrained of a model that is neither cached nor reachable retries for about a minute, so the local
    cache is tried first and the hub is asked with a short timeout before any download. folder_ok: whether the
    flag also takes a local folder (--model does; --reward takes a name)."""
    if os.path.isdir(name):
        try:
            return load(name)
        except Exception as e:  # any failure here means the folder is not what the flag needs
            raise LoadError(f"{flag}: the folder {name} does not hold a loadable model ({type(e).__name__}: {e})") from e
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoadError(f"{flag}: {name} is neither an existing folder nor a hub id of the form owner/name")
    try:
        return load(name, local_files_only=True)
    except OSError:
        pass  # not (fully) in the local cache: ask the hub below
    problem = _hub_problem(name, folder_ok)
    if problem:
        raise LoadError(f"{flag}: cannot load {name}: {problem}")
    return load(name)


def _hub_problem(name, folder_ok):
    """Why the hub cannot serve repo `name` to us now, or None; at most a few seconds."""
    from huggingface_hub import auth_check, constants, errors, model_info

    local = (f"or fill the local cache: `hf download {name}` where there is network, then copy "
             "~/.cache/huggingface here (or point HF_HOME at it)")
    if folder_ok:
        local += ", or pass a local folder holding the model (a save_pretrained copy or a downloaded snapshot)"
    if constants.HF_HUB_OFFLINE:
        return f"it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; unset it, {local}"
    try:
        if model_info(name, timeout=5).gated:
            auth_check(name)
    except errors.GatedRepoError:
        return (f"it is a gated repo: accept its licence on https://huggingface.co/{name}, then run "
                f"`hf auth login` (huggingface_hub >= 1.0; formerly `huggingface-cli login`) or set HF_TOKEN, {local}")
    except errors.RepositoryNotFoundError:
        return f"no such repo on the hub (a private one needs `hf auth login`); check the name, {local}"
    except Exception as e:  # network: DNS, proxy, firewall, timeout
        return f"it is not in the local cache and the hub cannot be reached ({type(e).__name__}: {e}); connect, {local}"
    return None


def save_lora(transformer, directory):
    """Save the transformer's peft LoRA so that pipe.load_lora_weights(directory) restores it exactly.

    The adapter config goes along as metadata: without it diffusers assumes lora_alpha = r, and a LoRA trained
    with alpha 64, rank 32 would load at half its scale."""
    from peft import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


class SD3World:
    """The World of INTERFACE.md on a StableDiffusion3Pipeline; base weights frozen, the LoRA is train.py's."""

    default_guidance = 4.5

    def __init__(self, pipe, device, dtype=torch.bfloat16, train_prompts=None, gradient_checkpointing=False,
                 offload_text_encoders=True, resolution=512):
        self.pipe, self.device, self.dtype = pipe, torch.device(device), dtype
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        self.transformer = pipe.transformer.to(self.device, dtype)
        pipe.vae.to(self.device, torch.float32)  # CHOICE 2
        self.text_encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        self.offload = offload_text_encoders
        for module in self.text_encoders:
            module.to("cpu" if offload_text_encoders else self.device, dtype)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        multiple = pipe.vae_scale_factor * pipe.patch_size
        if resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of {multiple} (VAE factor x patch size)")
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (self.transformer.config.in_channels, side, side)
        self.train_prompts = list(train_prompts) if train_prompts is not None else read_prompts(TRAIN_PROMPTS)
        self.eval_prompts = read_prompts(EVAL_PROMPTS)
        self._cache = OrderedDict()  # prompt -> its encoding rows, least recently used first
        self._negative = None  # the empty prompt's encoding rows (CHOICE 3)

    @classmethod
    def load(cls, model, device, dtype=torch.bfloat16, **kwargs):
        """From a hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a local folder; LoadError naming --model."""
        pipe = hub_load(lambda name, **kw: StableDiffusion3Pipeline.from_pretrained(name, dtype=dtype, **kw),
                        model, "--model")
        return cls(pipe, device, dtype, **kwargs)

    @torch.no_grad()
    def encode(self, prompts):
        """Batch-first prompt_embeds, pooled_prompt_embeds and their negative_ twins (the empty prompt) for CFG."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new or self._negative is None:
            rows = self._text_encode(new + [""] * (self._negative is None))
            if self._negative is None:
                self._negative = rows.pop()
            self._cache.update(zip(new, rows))
        for p in prompts:
            self._cache.move_to_end(p)
        cond = {k: torch.stack([self._cache[p][k] for p in prompts]) for k in self._negative}
        # a view: every row shares the one copy of the empty prompt's encoding
        cond.update({"negative_" + k: v.expand(len(prompts), *v.shape) for k, v in self._negative.items()})
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return cond

    def _text_encode(self, prompts):
        """One encoding dict per prompt, from the pipeline's encode_prompt on the device (CHOICE 4)."""
        if self.offload:
            for module in self.text_encoders:
                module.to(self.device)
        try:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH)
        finally:
            if self.offload:
                for module in self.text_encoders:
                    module.to("cpu")
        return [{"prompt_embeds": e, "pooled_prompt_embeds": p} for e, p in zip(embeds, pooled)]

    def velocity(self, x, t, cond, guidance):
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
        return v_u + guidance * (v_c - v_u)

    @torch.no_grad()
    def decode(self, x0):
        """(B, 3, H, W) float32 images in [0, 1]: the VAE undoes SD3's latent scaling and shift first."""
        vae = self.pipe.vae
        images = [vae.decode(z.float() / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
                  for z in x0.split(DECODE_CHUNK)]
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

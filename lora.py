"""The trained weights: peft's LoRA on the transformer, its optimizer step and its EMA (METHOD.md §5).

    LoRA.step      one optimizer step over the accumulated gradient: all-reduced under torchrun, norm-clipped,
                   AdamW, then the EMA; taken on every rank or on none
    EMA            Flow-GRPO's average of the LoRA, used to evaluate and to save (choice 15)
Choices: 13 (the LoRA's targets and float32 weights), 15 (the EMA), 17 (gradients all-reduced once a step).
"""
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

import parallel

LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # choice 13


def add_lora(transformer, rank, alpha):
    """peft's LoRA (gaussian init) on Flow-GRPO's targets (choice 13); returns its parameters, the trained ones."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights in float32 even on a bf16 model: Adam's small updates survive
    return params


class EMA:
    """Flow-GRPO's EMA of the trained parameters (its flow_grpo/ema.py): after optimizer step n, every `every`
    steps, ema += (1 - d) (p - ema) with d = min((1 + n) / (10 + n), decay), so early averages forget the init
    fast. decay 0 turns it off: swapped() then leaves the live weights in place."""

    def __init__(self, params, decay, every):
        self.params = params
        self.decay = decay
        self.every = every
        self.steps = 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self):
        n = self.steps
        self.steps += 1
        if self.decay == 0 or (n + 1) % self.every:
            return
        d = min((1 + n) / (10 + n), self.decay)
        for s, p in zip(self.shadow, self.params):
            s.add_((1 - d) * (p - s))

    @contextmanager
    def swapped(self):
        """The averaged weights in place of the live ones, for evaluation and saving."""
        live = [p.detach().clone() for p in self.params]
        if self.decay > 0:
            for p, s in zip(self.params, self.shadow):
                p.data.copy_(s)
        try:
            yield
        finally:
            for p, w in zip(self.params, live):
                p.data.copy_(w)

    def state_dict(self):
        return dict(steps=self.steps, shadow=self.shadow)

    def load_state_dict(self, state):
        self.steps = state["steps"]
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


class LoRA:
    """The LoRA of `transformer` (cfg.lora_rank, cfg.lora_alpha), its AdamW and its EMA."""

    def __init__(self, transformer, cfg):
        self.transformer = transformer
        self.params = add_lora(transformer, cfg.lora_rank, cfg.lora_alpha)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_every)
        self.max_grad_norm = cfg.max_grad_norm

    def step(self, finite):
        """Apply the accumulated .grad, if the loss was finite on every rank (else skip it everywhere); clear it.
        Returns whether the step was taken."""
        taken = parallel.all_true(finite)
        if taken:
            parallel.average_gradients(self.params)  # the whole batch's gradient (choice 17)
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.opt.step()
            self.ema.step()
        self.opt.zero_grad(set_to_none=True)
        return taken

    def averaged(self):
        """The EMA's weights in place of the live ones for a `with` block (the live ones if the EMA is off)."""
        return self.ema.swapped()

    def state_dict(self):
        """The live LoRA, the optimizer and the EMA: what resuming needs."""
        lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}
        return dict(lora=lora, opt=self.opt.state_dict(), ema=self.ema.state_dict())

    def load_state_dict(self, state):
        set_peft_model_state_dict(self.transformer, state["lora"])
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])

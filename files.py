"""What a run reads and writes, for both worlds: prompt files, models from the hub, checkpoints, the LoRA.

Every failure a user can cause (a missing prompt file, a model that cannot be loaded, a corrupt checkpoint, an
output folder that cannot be written) is a UserError whose message names the flag and says what to do; train.py
prints it as one line, `train.py: error: ...`, and exits with code 2, as argparse does for a bad flag.

A model that is neither cached nor reachable makes a plain from_pretrained retry for about a minute, so hub_load
tries the local cache first and asks the hub with a short timeout before any download.
"""
import json
import logging
import os
import pickle
import zipfile

import torch


class UserError(Exception):
    """A mistake in a flag, a file or a folder; the message names the flag and what to do."""


class LoadError(UserError):
    """A model, reward or prompt file that cannot be loaded."""


def read_prompts(path, check=None, split="train", flag="--prompts"):
    """The prompts of a text file, one a line, blank lines skipped; or of a Flow-GRPO dataset folder: its
    `split`.txt, or GenEval's `split`_metadata.jsonl, one JSON object a line whose "prompt" is read. A folder
    without them, a file that is missing, unreadable or empty, a malformed JSON line, or a prompt that check(prompt)
    refuses with a ValueError is a LoadError naming `flag` and the file (and the line)."""
    if os.path.isdir(path):
        path = _split_file(path, split, flag)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise LoadError(f"{flag} {path}: cannot read the file ({why}); give a text file, one prompt a line") from e
    if not lines:
        raise LoadError(f"{flag} {path}: the file holds no prompts; give a text file, one prompt a line")
    prompts = [_prompt_of(line, path, i, flag) if str(path).endswith(".jsonl") else line for i, line in lines]
    for prompt in prompts if check else []:
        try:
            check(prompt)
        except ValueError as e:
            raise LoadError(f"{flag} {path}: {e}") from None
    return prompts


def _split_file(folder, split, flag):
    """A Flow-GRPO dataset folder's file of `split`: split.txt (text datasets) or split_metadata.jsonl (GenEval)."""
    for name in (f"{split}.txt", f"{split}_metadata.jsonl"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise LoadError(f"{flag} {folder}: the folder holds neither {split}.txt nor {split}_metadata.jsonl (Flow-GRPO's "
                    "dataset layouts); give such a folder or a text file, one prompt a line")


def _prompt_of(line, path, number, flag):
    """The "prompt" of one line of a GenEval metadata file."""
    try:
        prompt = json.loads(line)["prompt"]
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{flag} {path}: line {number} is not a JSON object with a \"prompt\" "
                        f"({type(e).__name__}: {e})") from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise LoadError(f"{flag} {path}: line {number} has no prompt text in its \"prompt\" field")
    return prompt.strip()


def quiet_image_processors():
    """Drop transformers' warning that its torchvision image processors fall back to PIL ones.

    transformers names its image processors after a torchvision backend, which this project never installs (it pulls
    a CUDA build), and warns when diffusers' pipelines import them that it falls back to the PIL ones, the classes
    this project uses anyway: so no run prints two lines about it."""
    logger = logging.getLogger("transformers.utils.import_utils")
    logger.addFilter(lambda record: "requires torchvision" not in record.getMessage())


def hub_load(load, name, flag, folder_ok=True):
    """load(name, **kwargs) from a local folder or a hub id, or a LoadError within seconds saying why and what to do.

    folder_ok: whether the flag also takes a local folder (--model does; --reward takes a name)."""
    if os.path.isdir(name):
        try:
            return load(name)
        except Exception as e:  # any failure here means the folder is not what the flag needs
            why = f"{type(e).__name__}: {e}"
            raise LoadError(f"{flag}: the folder {name} does not hold a loadable model ({why})") from e
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoadError(f"{flag}: {name} is neither an existing folder nor a hub id of the form owner/name")
    try:
        return load(name, local_files_only=True)
    except OSError:
        pass  # not (fully) in the local cache: ask the hub below, with a short timeout
    problem = _hub_problem(name, folder_ok)
    if problem:
        raise LoadError(f"{flag}: cannot load {name}: {problem}")
    return load(name)


def hub_file(filename):
    """A loader for hub_load of one file of a hub repo that is no transformers folder (a checkpoint, a vocabulary):
    load(repo, **kwargs) -> the file's local path, fetched or found in the cache by hf_hub_download."""
    from huggingface_hub import hf_hub_download

    return lambda repo, **kwargs: hf_hub_download(repo, filename, **kwargs)


def _hub_problem(name, folder_ok):
    """Why the hub cannot serve repo `name` to us now, or None; at most a few seconds."""
    from huggingface_hub import auth_check, constants, errors, model_info

    local = (f"or fill the local cache: `hf download {name}` where there is network, then copy "
             "~/.cache/huggingface here (or point HF_HOME at it)")
    if folder_ok:
        local += ", or pass a local folder holding the model (a save_pretrained copy or a downloaded snapshot)"
    if constants.HF_HUB_OFFLINE:
        return (f"it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; unset it, "
                f"{local}")
    try:
        if model_info(name, timeout=5).gated:
            auth_check(name)
    except errors.GatedRepoError:
        return (f"it is a gated repo: accept its licence on https://huggingface.co/{name}, then run "
                f"`hf auth login` (huggingface_hub >= 1.0; formerly `huggingface-cli login`) or set HF_TOKEN, {local}")
    except errors.RepositoryNotFoundError:
        return f"no such repo on the hub (a private one needs `hf auth login`); check the name, {local}"
    except Exception as e:  # network: DNS, proxy, firewall, timeout
        why = f"{type(e).__name__}: {e}"
        return f"it is not in the local cache and the hub cannot be reached ({why}); connect, {local}"
    return None


def output_folder(path):
    """Create --out if needed and prove it writable now, not after the first iteration's work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {path}: it is a file, not a folder; choose a folder for the run's outputs")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there ({e.strerror}); choose a folder you can write") from e


def save_lora(transformer, directory):
    """Save the transformer's peft LoRA so that pipe.load_lora_weights(directory) restores it exactly.

    The adapter config goes along as metadata: without it diffusers assumes lora_alpha = r, and a LoRA trained
    with alpha 64, rank 32 would load at half its scale."""
    from diffusers.loaders import SD3LoraLoaderMixin
    from peft import get_peft_model_state_dict

    SD3LoraLoaderMixin.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


CHECKPOINT = "ckpt.pt"
CHECKPOINT_KEYS = {"lora", "opt", "ema", "it", "history", "world_size"}


def has_checkpoint(out):
    return os.path.isfile(os.path.join(out, CHECKPOINT))


def save_checkpoint(out, lora, progress):
    """out/ckpt.pt: the live LoRA, its optimizer and EMA (lora.state_dict()) and `progress` (it, history, world_size),
    to resume from; out/lora: the LoRA to use, the EMA's (choice 15), in diffusers' format
    (pipe.load_lora_weights(out/lora)). Each is written to a temporary name, then renamed: an interrupt leaves a
    whole one."""
    torch.save(lora.state_dict() | progress, os.path.join(out, CHECKPOINT + ".tmp"))
    os.replace(os.path.join(out, CHECKPOINT + ".tmp"), os.path.join(out, CHECKPOINT))
    with lora.averaged():
        save_lora(lora.transformer, os.path.join(out, "lora.tmp"))
    os.makedirs(os.path.join(out, "lora"), exist_ok=True)
    for f in os.listdir(os.path.join(out, "lora.tmp")):
        os.replace(os.path.join(out, "lora.tmp", f), os.path.join(out, "lora", f))
    os.rmdir(os.path.join(out, "lora.tmp"))


def load_checkpoint(out, lora, ranks):
    """Restore `lora` from out/ckpt.pt and return the run's (it, history); a file that is not a checkpoint of this
    run (unreadable, foreign, of other flags or another number of ranks) is a UserError naming --resume."""
    path = os.path.join(out, CHECKPOINT)
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}); "
                        "delete it to start afresh, or point --out at another run") from e
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise UserError(f"--resume: {path} is not a checkpoint of this train.py (keys missing); "
                        "delete it to start afresh, or point --out at another run")
    if state["world_size"] != ranks:
        raise UserError(f"--resume: {path} was written by a run on {state['world_size']} rank(s), this one has "
                        f"{ranks}: resume with the same number of processes")
    try:
        lora.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume: {path} was written by a run of other flags ({type(e).__name__}); "
                        "resume with that run's flags (its config.json), or choose another --out") from e
    return state["it"], state["history"]

"""Meta-training checkpoints: one safetensors file, written atomically, holding the meta-LoRA, Adam's state, the step
and every RNG state, so that a resumed run continues exactly as an uninterrupted one would; and the run's log,
trimmed back to the checkpoint on resume."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .adapter import LoRAFormatError
from .backbone import Backbone
from .io import atomic_write_bytes
from .lora import load_lora_state_dict, lora_parameters, lora_state_dict

__all__ = ["CHECKPOINT", "RESUMABLE_CHANGES", "save_checkpoint", "load_checkpoint", "checkpoint_lora", "truncate_log"]

CHECKPOINT = "checkpoint.safetensors"


def _rng_state(py: random.Random, gen: torch.Generator) -> tuple[dict, dict[str, torch.Tensor]]:
    version, state, gauss = py.getstate()
    return (
        {"python": [version, list(state), gauss]},
        {"rng.torch_gen": gen.get_state(), "rng.torch_global": torch.get_rng_state()},
    )


def save_checkpoint(
    path: Path,
    backbone: Backbone,
    opt: torch.optim.Optimizer,
    step: int,
    config,
    py: random.Random,
    gen: torch.Generator,
    extra: dict,
) -> None:
    """Write the meta-LoRA on `backbone`, `opt`'s Adam moments, `step`, `config` (a dataclass, for `load_checkpoint`
    to compare), the RNG states and `extra` to `path`, atomically."""
    tensors = {f"lora.{k}": v for k, v in lora_state_dict(backbone.model).items()}
    params = lora_parameters(backbone.model)
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"adam.{i}.{k}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"adam.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    meta, rng_tensors = _rng_state(py, gen)
    tensors.update(rng_tensors)
    metadata = {
        "step": str(step),
        "config": json.dumps(asdict(config)),
        "rng": json.dumps(meta),
        "extra": json.dumps(extra),
    }
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


# Settings a resumed run may change, as they do not alter the steps already trained: how often to checkpoint, and
# the number of steps (a longer run continues the same schedule; the change is recorded in the exported LoRA).
RESUMABLE_CHANGES = ("checkpoint_every", "steps")


def _check_resume(path: Path, saved: Optional[str], config, step: int) -> dict:
    """Refuse to resume from a checkpoint made with other settings (seed, lr, ...), naming them; returns the
    recorded changes (``{"steps": [before, after]}``) of the settings that may change."""
    try:
        before = json.loads(saved)
    except (TypeError, ValueError):
        raise LoRAFormatError(f"checkpoint {path} does not record its settings, so it cannot be resumed") from None
    now = json.loads(json.dumps(asdict(config)))
    changed = sorted(k for k in set(before) | set(now) if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path.parent}: the run was started with other settings ({diff}). Resume "
            "with the same settings, or start the run anew in another output folder."
        )
    if config.steps < step:
        raise ValueError(f"cannot resume {path.parent} with steps={config.steps}: its checkpoint is at step {step}")
    return {"steps": [before.get("steps"), config.steps]} if before.get("steps") != config.steps else {}


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        raise LoRAFormatError(f"checkpoint {path} is unreadable ({e})") from None


def _lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}


def checkpoint_lora(out: Union[str, Path]) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, LoRA tensors in `lora_state_dict` layout) of the last checkpoint in the meta-training folder `out`:
    the meta-LoRA as training left it, whatever model selection exported."""
    metadata, tensors = _read_checkpoint(Path(out) / CHECKPOINT)
    return int(metadata["step"]), _lora_tensors(tensors)


def load_checkpoint(
    path: Path, backbone: Backbone, opt: torch.optim.Optimizer, py: random.Random, gen: torch.Generator, config
) -> tuple[int, dict]:
    """Restore the meta-LoRA, Adam's moments and the RNG states from `path`; returns (step, extra). Refuses a
    checkpoint made with settings other than `config`'s, except `RESUMABLE_CHANGES`."""
    metadata, tensors = _read_checkpoint(path)
    step, extra = int(metadata["step"]), json.loads(metadata.get("extra", "{}"))
    change = _check_resume(path, metadata.get("config"), config, step)
    if change:  # recorded, so that the exported LoRA says how the run was extended
        extra["resumed"] = [*extra.get("resumed", []), {"at_step": step, **change}]
    load_lora_state_dict(backbone.model, _lora_tensors(tensors))
    device = backbone.device
    for i, p in enumerate(lora_parameters(backbone.model)):
        if f"adam.{i}.exp_avg" in tensors:
            opt.state[p] = {
                "step": tensors[f"adam.{i}.step"].reshape(()).clone(),
                "exp_avg": tensors[f"adam.{i}.exp_avg"].to(device),
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(device),
            }
    version, state, gauss = json.loads(metadata["rng"])["python"]
    py.setstate((version, tuple(state), gauss))
    gen.set_state(tensors["rng.torch_gen"])
    torch.set_rng_state(tensors["rng.torch_global"])
    return step, extra


def truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to `step` (a killed run may have logged past its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())

"""LoRA files: the `LoRAAdapter` container and its on-disk formats.

Native format = PEFT's layout, so PEFT loads our files into the same timm model and we load PEFT's:

* ``adapter_config.json``: a PEFT ``LoraConfig`` (``target_modules`` regex, ``r``, ``lora_alpha``, patterns,
  ``modules_to_save=["head"]``, ``base_model_name_or_path`` = the timm backbone).
* ``adapter_model.safetensors``: ``base_model.model.blocks.{i}.attn.qkv.lora_A.weight`` etc., plus
  ``base_model.model.head.{weight,bias}``. Its metadata header carries ``recycle``: JSON with what PEFT has no field
  for (our targets, the class names, provenance).

A q/v LoRA of rank r is stored fused on timm's ``qkv``: ``lora_A = cat(A_q, A_v)`` ``(2r, D)`` and ``lora_B`` block
diagonal ``(3D, 2r)`` with zero k rows; ``lora_alpha = 2r·s`` keeps PEFT's scaling ``alpha / r`` equal to ``s``.

The head is a Linear on the backbone's pre-logits feature, i.e. exactly the ``head`` of
``timm.create_model(backbone, num_classes=N)``. For CLIP, a head on the 512-d projected embedding (the paper's)
is the composition ``fc ∘ proj``, which is again one Linear on the pre-logits; importers compose it.

Also imported: PEFT adapters saved for timm ViTs (raw keys, or transformers' ``timm_model.`` wrapper prefix) and the
official LoRA Recycle files (``w_a_XXX``/``w_b_XXX`` q/v LoRAs on HF CLIP plus ``fc_{in}in_{out}out``).
Refused with a reason: pickles, non-LoRA PEFT types, DoRA and bias variants, shapes that do not fit the backbone,
and non-finite values.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .io import atomic_write_bytes, dumps_strict, loads_strict
from .lora import (TARGETS, LoRAConfig, inject_lora, load_lora_state_dict, lora_state_dict, merge_lora, planned_shapes,
                   remove_lora)

__all__ = ["LoRAAdapter", "LoRAFormatError", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PICKLE_SUFFIXES",
           "save_adapter", "read_adapter", "load_lora"]

_logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FORMAT_VERSION = 1
_PEFT_PREFIXES = ("base_model.model.timm_model.", "base_model.model.", "timm_model.")
_SUFFIX_TO_TARGET = {v: k for k, v in TARGETS.items() if k != "qv"}  # attn.qkv -> qkv, attn.proj -> proj, ...


class LoRAFormatError(ValueError):
    """A LoRA file that cannot be used. The message says which file and why."""


@dataclass
class LoRAAdapter:
    """A LoRA, its optional classification head and everything needed to rebuild the model.

    Attributes:
        config: targets, rank, scaling and blocks.
        state: LoRA tensors in `recycle.lora.lora_state_dict` layout.
        backbone: the backbone name it was tuned on, if known.
        head_weight, head_bias: head on the pre-logits feature, ``(N, num_features)`` and ``(N,)``.
        class_names: the head's classes, in output order.
        info: free-form provenance (how it was made).
    """

    config: LoRAConfig
    state: dict[str, torch.Tensor]
    backbone: Optional[str] = None
    head_weight: Optional[torch.Tensor] = None
    head_bias: Optional[torch.Tensor] = None
    class_names: Optional[list[str]] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, t in self.tensors().items():
            if not torch.is_floating_point(t):
                raise LoRAFormatError(f"LoRA tensor {key} has dtype {t.dtype}; floating point is required")
            if t.numel() == 0:  # a zero-size tensor can declare any rank or class count while holding nothing
                raise LoRAFormatError(f"LoRA tensor {key} has shape {list(t.shape)}, with no elements")
            if not torch.isfinite(t).all():
                raise LoRAFormatError(f"LoRA tensor {key} contains NaN or Inf values")
        if self.class_names is not None and (not isinstance(self.class_names, (list, tuple)) or not all(
                isinstance(c, str) for c in self.class_names)):
            raise LoRAFormatError(f"class names must be a list of strings, got {_shown(self.class_names)}")
        if self.head_weight is not None:
            if self.head_weight.ndim != 2:
                raise LoRAFormatError(f"the head weight has shape {list(self.head_weight.shape)}; a matrix "
                                      "(classes, features) is expected")
            n = self.head_weight.shape[0]
            if self.head_bias is not None and tuple(self.head_bias.shape) != (n,):
                raise LoRAFormatError(f"head bias has shape {list(self.head_bias.shape)}, expected [{n}]")
            if self.class_names is None:
                self.class_names = [f"class_{i}" for i in range(n)]
            if len(self.class_names) != n:
                raise LoRAFormatError(f"the head has {n} outputs but {len(self.class_names)} class names are given")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.state)
        if self.head_weight is not None:
            out["head.weight"] = self.head_weight
        if self.head_bias is not None:
            out["head.bias"] = self.head_bias
        return out

    @property
    def num_classes(self) -> int:
        return 0 if self.head_weight is None else int(self.head_weight.shape[0])

    def fingerprint(self) -> str:
        """A content hash: equal adapters have equal fingerprints."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for key, t in sorted(self.tensors().items()):
            h.update(key.encode())
            h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_model(cls, model: nn.Module, config: LoRAConfig, head: Optional[nn.Linear] = None,
                   class_names: Optional[list[str]] = None, backbone: Optional[str] = None,
                   info: Optional[dict] = None) -> "LoRAAdapter":
        """Snapshot the LoRA layers of `model` (and `head`) into an adapter."""
        state = lora_state_dict(model)
        if not state:
            raise ValueError("the model carries no LoRA layers")
        hw = head.weight.detach().cpu().clone() if head is not None else None
        hb = head.bias.detach().cpu().clone() if head is not None and head.bias is not None else None
        return cls(config, state, backbone, hw, hb, list(class_names) if class_names else None, dict(info or {}))

    def inject(self, model: nn.Module) -> list[str]:
        """Add this LoRA to a timm ViT in place. Every shape and rank is checked against the backbone before
        anything is allocated. Use `remove_lora` to take it off."""
        made_for = f" (it was made for '{self.backbone}')" if self.backbone else ""
        try:
            planned = planned_shapes(model, self.config)
        except ValueError as e:
            raise LoRAFormatError(f"this LoRA does not fit the backbone{made_for}: {e}") from None
        wrong = [f"{k} has shape {list(self.state[k].shape)}, the backbone needs {list(v)}"
                 for k, v in planned.items() if k in self.state and tuple(self.state[k].shape) != v]
        missing, unexpected = sorted(set(planned) - set(self.state)), sorted(set(self.state) - set(planned))
        if wrong or missing or unexpected:
            detail = "; ".join(wrong[:2]) or f"missing {missing[:4]}, unexpected {unexpected[:4]}"
            raise LoRAFormatError(f"this LoRA does not fit the backbone{made_for}: {detail}")
        try:
            paths = inject_lora(model, self.config)
        except ValueError as e:
            raise LoRAFormatError(f"this LoRA does not fit the backbone: {e}") from None
        try:
            load_lora_state_dict(model, self.state)
        except ValueError as e:
            remove_lora(model)
            raise LoRAFormatError(f"this LoRA does not fit the backbone{made_for}: {e}") from None
        return paths

    @contextlib.contextmanager
    def attached(self, backbone, merged: bool = False) -> Iterator[Optional[nn.Linear]]:
        """Attach this LoRA to `backbone` (a `Backbone`) for the duration of the block; yields the head or None.

        Holds the backbone's lock, so classifiers and teachers can share one backbone safely. ``merged=True`` folds
        the update into the base weights (inference at the bare model's speed); the original weights are restored
        exactly afterwards.
        """
        with backbone.lock:
            self.inject(backbone.model)
            try:
                if merged:
                    try:
                        merge_lora(backbone.model)
                    except ValueError as e:  # a finite LoRA whose update overflows the weights
                        raise LoRAFormatError(f"this LoRA cannot be used: {e}") from None
                head = self.build_head(backbone.num_features)
                yield head.to(backbone.device) if head is not None else None
            finally:
                remove_lora(backbone.model)

    def build_head(self, num_features: int) -> Optional[nn.Linear]:
        """The head as an `nn.Linear` on a ``num_features`` pre-logits feature, or None if there is none."""
        if self.head_weight is None:
            return None
        n, d = self.head_weight.shape
        if d != num_features:
            made_for = f" (it was made for '{self.backbone}')" if self.backbone else ""
            raise LoRAFormatError(f"the LoRA's head takes {d} features but the backbone gives {num_features}{made_for}")
        head = nn.Linear(d, n, bias=True)
        with torch.no_grad():
            head.weight.copy_(self.head_weight)
            head.bias.copy_(self.head_bias if self.head_bias is not None else torch.zeros(n))
        return head


# ---------------------------------------------------------------------------------------------------------- writing
def _module_groups(state: dict[str, torch.Tensor]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{path: {"lora_A": {slice: t}, "lora_B": {slice: t}}}`` from a lora_state_dict."""
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in state.items():
        path, kind, slice_name = key.rsplit(".", 2)
        groups.setdefault(path, {"lora_A": {}, "lora_B": {}})[kind][slice_name] = t
    return groups


def _module_scaling(config: LoRAConfig, path: str, rank: int) -> float:
    override = config.extra.get(path, {})
    alpha = override.get("alpha", config.alpha)
    return 1.0 if alpha is None else float(alpha) / rank


def save_adapter(adapter: LoRAAdapter, directory: Union[str, Path]) -> Path:
    """Write `adapter` in PEFT's layout (atomically, file by file). Returns the directory."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, tuple[int, float]] = {}
    for path, group in _module_groups(adapter.state).items():
        names = list(group["lora_A"])
        rank = group["lora_A"][names[0]].shape[0]
        if names == ["all"]:
            a, b = group["lora_A"]["all"], group["lora_B"]["all"]
        else:  # q/v slices of qkv -> one rank-2r pair with zero k rows
            a = torch.cat([group["lora_A"][k] for k in ("q", "v")], dim=0)
            d = group["lora_B"]["q"].shape[0]
            b = a.new_zeros(3 * d, 2 * rank)
            b[:d, :rank] = group["lora_B"]["q"]
            b[2 * d:, rank:] = group["lora_B"]["v"]
        scaling = _module_scaling(adapter.config, path, rank)
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
        per_module[path] = (a.shape[0], scaling * a.shape[0])
    if adapter.head_weight is not None:
        tensors["base_model.model.head.weight"] = adapter.head_weight.contiguous()
        tensors["base_model.model.head.bias"] = (adapter.head_bias if adapter.head_bias is not None
                                                 else torch.zeros(adapter.num_classes)).contiguous()
    (r, alpha), _ = Counter(per_module.values()).most_common(1)[0]
    # Keys are plain module names, which every PEFT reads: 0.13 falls back to looking the module's full name up
    # verbatim, later versions match each key as a regex at the end of the name ('.' matches itself). Escaped keys
    # (blocks\.0\.mlp...) are read by the later versions only.
    rank_pattern = {p: v[0] for p, v in per_module.items() if v[0] != r}
    alpha_pattern = {p: v[1] for p, v in per_module.items() if v[1] != alpha}
    blocks = sorted({int(p.split(".")[1]) for p in per_module})
    suffixes = sorted({p.split(".", 2)[2] for p in per_module})
    target_regex = rf"blocks\.({'|'.join(map(str, blocks))})\.({'|'.join(re.escape(s) for s in suffixes)})"
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": adapter.backbone,
        "auto_mapping": {"base_model_class": "VisionTransformer",
                         "parent_library": "timm.models.vision_transformer"},
        "r": int(r), "lora_alpha": float(alpha), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": target_regex, "modules_to_save": ["head"] if adapter.head_weight is not None else None,
        "lora_dropout": adapter.config.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None,
    }
    meta = {"version": FORMAT_VERSION, "config": adapter.config.to_dict(), "backbone": adapter.backbone,
            "class_names": adapter.class_names, "head_input": "pre_logits", "info": adapter.info}
    weights = safetensors_bytes({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()},
                         metadata={"format": "pt", "recycle": dumps_strict(meta)})
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, weights)
    atomic_write_bytes(directory / ADAPTER_CONFIG, dumps_strict(peft_config, indent=2, sort_keys=True).encode())
    return directory


# ---------------------------------------------------------------------------------------------------------- reading
def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.stat().st_size == 0:
        raise LoRAFormatError(f"{path.name} is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="pt") as f:  # one open: header, metadata and tensors
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoRAFormatError(f"{path.name} is not a valid safetensors file (corrupt or truncated?): {e}") from None


def _refuse_pickles(folder: Path, label: str) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise LoRAFormatError(
        f"'{label}' has no {ADAPTER_WEIGHTS}"
        + (f"; it has {pickles}, pickled weights, which are never loaded because unpickling can run arbitrary code."
           " Convert them where you trust them: PeftModel.from_pretrained(base_model, folder).save_pretrained(folder)"
           " writes adapter_model.safetensors (PEFT >= 0.7), or safetensors.torch.save_file(state_dict, "
           f"'{ADAPTER_WEIGHTS}') next to {ADAPTER_CONFIG}." if pickles else "."))


def _shown(value, limit: int = 60) -> str:
    """`value`'s repr, cut to `limit` characters, for error messages about untrusted data."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# PEFT matches a rank_pattern/alpha_pattern key K as the regex ``(.*\.)?(K)$`` against module names. Untrusted
# regexes can take exponential time, so only the keys PEFT itself and its users write are accepted: a module path
# (word characters and dots, ``.`` escaped or not), optionally anchored with ``^`` and ``$``. Each character is a
# single alternative, so checking a key is linear, and matching one is a fixed-length comparison.
_PATTERN_KEY = re.compile(r"\^?(?:[A-Za-z0-9_]|\\\.|\.)+\$?")
_MAX_PATTERN_KEY = 200
_MAX_PATTERNS = 1000


@dataclass(frozen=True)
class _ModulePattern:
    """A PEFT pattern key in the accepted subset; ``chars`` holds None where an unescaped ``.`` matches any one
    character."""

    key: str
    chars: tuple
    anchored: bool

    @classmethod
    def parse(cls, key: object, field: str, name: str) -> "_ModulePattern":
        if not isinstance(key, str) or not key or len(key) > _MAX_PATTERN_KEY or not _PATTERN_KEY.fullmatch(key):
            raise LoRAFormatError(
                f"{name}: {field} key {_shown(key)} is not supported: keys must be module paths such as "
                "'blocks.0.attn.qkv' or 'fc2' (word characters and dots, optionally escaped as '\\.' and anchored "
                f"with '^' or '$', at most {_MAX_PATTERN_KEY} characters); other regular expressions are refused")
        body = key[1:] if key.startswith("^") else key
        body = body[:-1] if body.endswith("$") else body
        chars, i = [], 0
        while i < len(body):
            if body[i] == "\\":
                chars.append(".")
                i += 2
            else:
                chars.append(None if body[i] == "." else body[i])
                i += 1
        return cls(key, tuple(chars), key.startswith("^"))

    def matches(self, path: str) -> bool:
        r"""What ``re.match(rf"(.*\.)?({key})$", path)`` gives, in time linear in the key's length."""
        start = len(path) - len(self.chars)
        if start < 0 or (start > 0 and (self.anchored or path[start - 1] != ".")):
            return False
        return all(c is None or c == p for c, p in zip(self.chars, path[start:]))


def _number(value: object, field: str, name: str, integer: bool = False) -> Union[int, float]:
    """A config number: an int (for ranks) or a finite positive number; anything else is refused by name."""
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise LoRAFormatError(f"{name}: {field} must be {kind}, got {_shown(value)}")
    return value


def _patterns(cfg: dict, field: str, name: str, integer: bool) -> list[tuple[_ModulePattern, Union[int, float]]]:
    patterns = cfg.get(field) or {}
    if not isinstance(patterns, dict):
        raise LoRAFormatError(f"{name}: {field} must be an object mapping module names to values, got "
                              f"{_shown(patterns)}")
    if len(patterns) > _MAX_PATTERNS:
        raise LoRAFormatError(f"{name}: {field} has {len(patterns)} keys; at most {_MAX_PATTERNS}")
    return [(_ModulePattern.parse(k, field, name), _number(v, f"{field}[{_shown(k)}]", name, integer))
            for k, v in patterns.items()]



def peft_scale_settings(cfg: dict, name: str) -> tuple[bool, int, float, list, list, float]:
    """The scale settings of a PEFT LoRA config, checked: (use_rslora, r, lora_alpha, rank_pattern entries,
    alpha_pattern entries, lora_dropout).

    Raises:
        LoRAFormatError: a setting of the wrong type or out of range, naming the file `name`.
    """
    r_default = _number(cfg.get("r", 8), "'r'", name, integer=True)
    alpha_default = _number(cfg.get("lora_alpha", 8), "'lora_alpha'", name)
    rank_patterns = _patterns(cfg, "rank_pattern", name, integer=True)
    alpha_patterns = _patterns(cfg, "alpha_pattern", name, integer=False)
    dropout = cfg.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoRAFormatError(f"{name}: 'lora_dropout' must be a number in [0, 1), got {_shown(dropout)}")
    return bool(cfg.get("use_rslora")), r_default, alpha_default, rank_patterns, alpha_patterns, float(dropout)


def _pattern_value(patterns: list[tuple[_ModulePattern, Union[int, float]]], path: str, default):
    """PEFT's rule: the first key that matches the end of the module name gives its value."""
    for pattern, value in patterns:
        if pattern.matches(path):
            return value
    return default


def _strip_prefix(key: str) -> str:
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _check_peft_config(cfg: dict, name: str) -> None:
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LoRAFormatError(f"{name}: this is a PEFT '{cfg.get('peft_type')}' adapter, not LoRA; only LoRA "
                              "adapters can be recycled")
    refusals = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "layer_replication": "layer replication",
                "target_parameters": "parameter targets", "use_qalora": "QALoRA"}
    for key, what in refusals.items():
        if cfg.get(key):
            raise LoRAFormatError(f"{name}: the adapter uses {what} ('{key}'), which LoRA Recycle does not support")
    if cfg.get("bias", "none") != "none":
        raise LoRAFormatError(f"{name}: the adapter trains biases (bias='{cfg['bias']}'), which is not supported")


def _from_peft(cfg: dict, tensors: dict[str, torch.Tensor], meta: dict, name: str) -> LoRAAdapter:
    _check_peft_config(cfg, name)
    ours = meta.get("config") if meta.get("version") == FORMAT_VERSION else None
    if ours is not None and not isinstance(ours, dict):
        raise LoRAFormatError(f"{name}: the metadata's 'config' must be an object, got {_shown(ours)}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = _strip_prefix(key).replace(".default.", ".").replace(".modules_to_save.", ".")
        m = re.fullmatch(r"(blocks\.\d{1,4}\.[\w.]+)\.(lora_A|lora_B)\.weight", k)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif k in ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias"):
            head[k.rsplit(".", 1)[1]] = t
        else:
            raise LoRAFormatError(f"{name}: unsupported tensor {_shown(key, 100)} (only LoRA pairs on ViT blocks "
                                  "(block indices below 10000) and a head are supported)")
    if not pairs:
        raise LoRAFormatError(f"{name}: the file holds no LoRA weights")
    use_rslora, r_default, alpha_default, rank_patterns, alpha_patterns, dropout = peft_scale_settings(cfg, name)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    targets: set[str] = set()
    qv = ours is not None and "qv" in ours.get("targets", ())
    for path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise LoRAFormatError(f"{name}: {path} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or not a.numel() or not b.numel():
            raise LoRAFormatError(f"{name}: {path} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do "
                                  "not form a low-rank pair")
        suffix = path.split(".", 2)[2]
        if suffix not in _SUFFIX_TO_TARGET:
            raise LoRAFormatError(f"{name}: LoRA on '{path}' is not supported (targets: {sorted(_SUFFIX_TO_TARGET)})")
        file_rank = a.shape[0]
        declared = _pattern_value(rank_patterns, path, r_default)
        if declared != file_rank:
            raise LoRAFormatError(f"{name}: {path} has rank {file_rank} but the config says {declared}")
        alpha = float(_pattern_value(alpha_patterns, path, alpha_default))
        scaling = alpha / math.sqrt(file_rank) if use_rslora else alpha / file_rank
        target = _SUFFIX_TO_TARGET[suffix]
        if qv and target == "qkv":
            if file_rank % 2:
                raise LoRAFormatError(f"{name}: {path} is marked q/v but has odd rank {file_rank}")
            r = file_rank // 2
            d = b.shape[0] // 3
            off = torch.cat([b[d:2 * d].flatten(), b[:d, r:].flatten(), b[2 * d:, :r].flatten()])
            if b.shape[0] % 3 or off.abs().max() > 0:
                raise LoRAFormatError(f"{name}: {path} is marked q/v but lora_B is not block diagonal with zero k rows")
            state[f"{path}.lora_A.q"], state[f"{path}.lora_A.v"] = a[:r], a[r:]
            state[f"{path}.lora_B.q"], state[f"{path}.lora_B.v"] = b[:d, :r], b[2 * d:, r:]
            target, rank = "qv", r
        else:
            state[f"{path}.lora_A.all"], state[f"{path}.lora_B.all"] = a, b
            rank = file_rank
        targets.add(target)
        ranks[path] = (rank, scaling * rank)
    (rank, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    extra = {p: {"rank": r, "alpha": a} for p, (r, a) in ranks.items() if (r, a) != (rank, alpha)}
    blocks = sorted({int(p.split(".")[1]) for p in pairs})
    if ours is not None:  # our own file: the exact config it was saved with
        try:
            config = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ours.items()})
        except (TypeError, ValueError) as e:
            raise LoRAFormatError(f"{name}: invalid LoRA config in the file's metadata: {e}") from None
        for path, (tensor_rank, _) in sorted(ranks.items()):  # the metadata must describe the tensors it sits on
            override = config.extra.get(path) if isinstance(config.extra, dict) else None
            declared = override.get("rank", config.rank) if isinstance(override, dict) else config.rank
            if declared != tensor_rank:
                raise LoRAFormatError(f"{name}: the file's metadata says rank {_shown(declared)} for {path}, but its "
                                      f"tensors have rank {tensor_rank}; the file is inconsistent, so it is refused")
    else:
        config = LoRAConfig(targets=tuple(sorted(targets)), rank=rank, alpha=None if alpha == rank else alpha,
                            dropout=float(dropout), blocks=tuple(blocks), extra=extra)
    backbone = meta.get("backbone") or cfg.get("base_model_name_or_path")
    if backbone is not None and not isinstance(backbone, str):
        raise LoRAFormatError(f"{name}: the backbone name must be a string, got {_shown(backbone)}")
    info = meta.get("info") or {}
    if not isinstance(info, dict):
        raise LoRAFormatError(f"{name}: the metadata's 'info' must be an object, got {_shown(info)}")
    return LoRAAdapter(config, state, backbone=backbone, head_weight=head.get("weight"), head_bias=head.get("bias"),
                       class_names=meta.get("class_names"), info=dict(info))


def _from_official(tensors: dict[str, torch.Tensor], name: str, backbone) -> LoRAAdapter:
    """Official LoRA Recycle file: ``w_a_{i:03d}``/``w_b_{i:03d}`` (even i = q_proj, odd = v_proj of layer i//2,
    update ``B A x`` with scale 1) and ``fc_{in}in_{out}out`` (head on CLIP's projected embedding, no bias)."""
    a_keys = sorted(k for k in tensors if re.fullmatch(r"w_a_\d{3}", k))
    head_keys = [k for k in tensors if re.fullmatch(r"fc_\d+in_\d+out", k)]
    unknown = sorted(set(tensors) - set(a_keys) - {k.replace("w_a_", "w_b_") for k in a_keys} - set(head_keys))
    if unknown:
        raise LoRAFormatError(f"{name}: unexpected tensors {unknown[:5]} in an official LoRA Recycle file")
    if len(a_keys) % 2:
        raise LoRAFormatError(f"{name}: {len(a_keys)} w_a tensors; q/v pairs need an even number")
    state = {}
    for i, key in enumerate(a_keys):
        if key != f"w_a_{i:03d}" or f"w_b_{i:03d}" not in tensors:
            raise LoRAFormatError(f"{name}: w_a/w_b tensors are not numbered 000..{len(a_keys) - 1:03d} in pairs")
        slice_name = "q" if i % 2 == 0 else "v"
        state[f"blocks.{i // 2}.attn.qkv.lora_A.{slice_name}"] = tensors[key]
        state[f"blocks.{i // 2}.attn.qkv.lora_B.{slice_name}"] = tensors[f"w_b_{i:03d}"]
    if not state:
        raise LoRAFormatError(f"{name}: no w_a_XXX/w_b_XXX tensors found")
    rank = int(tensors["w_a_000"].shape[0])
    config = LoRAConfig(targets=("qv",), rank=rank)
    head_w = head_b = None
    if head_keys:
        if backbone is None:
            raise LoRAFormatError(f"{name}: an official LoRA Recycle head sits on CLIP's projection; pass the "
                                  "backbone so it can be mapped onto the pre-logits feature")
        if backbone.embedding != "projection":
            raise LoRAFormatError(f"{name}: official LoRA Recycle files are for CLIP backbones, not '{backbone.name}'")
        fc = tensors[head_keys[0]].float()
        proj = backbone.model.head
        if fc.ndim != 2 or fc.shape[1] != proj.out_features:
            raise LoRAFormatError(f"{name}: the head has shape {list(fc.shape)}, taking {fc.shape[-1]} features, but "
                                  f"'{backbone.name}' projects to {proj.out_features}")
        with torch.no_grad():  # fc(proj(x)) = (fc W_p) x + fc b_p; the official head has no bias
            head_w = fc @ proj.weight.detach().cpu().float()
            head_b = fc @ proj.bias.detach().cpu().float() if proj.bias is not None else torch.zeros(fc.shape[0])
    return LoRAAdapter(config, state, backbone=getattr(backbone, "name", None), head_weight=head_w,
                       head_bias=head_b, info={"source": "official LoRA Recycle file", "file": name})


def read_adapter(path: Union[str, Path], backbone=None, name: Optional[str] = None) -> LoRAAdapter:
    """Read a LoRA from a local folder (PEFT layout) or a ``.safetensors`` file (PEFT keys or official format).

    Args:
        path: folder or file.
        backbone: the `Backbone` it will be used with; required to map an official file's head.
        name: what to call it in error messages (default: the file or folder name), e.g. a Hub id for a download.

    Raises:
        LoRAFormatError: missing, pickled, corrupt, non-LoRA or unsupported files, or non-finite values.
    """
    path = Path(path)
    label = name or path.name
    if not path.exists():
        raise LoRAFormatError(f"LoRA path '{path}' does not exist")
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise LoRAFormatError(f"{path.name} is a pickle; pickled weights are never loaded because unpickling can "
                              "run arbitrary code. Use a .safetensors file.")
    if path.is_file() and path.suffix != ".safetensors":
        raise LoRAFormatError(f"{path.name} is not a .safetensors file or a PEFT adapter folder")
    if path.is_dir():
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            singles = sorted(path.glob("*.safetensors"))
            if len(singles) == 1 and not (path / ADAPTER_CONFIG).is_file():
                return read_adapter(singles[0], backbone, name)
            _refuse_pickles(path, name or str(path))
        tensors, metadata = _read_safetensors(weights)
        config_file = path / ADAPTER_CONFIG
        if not config_file.is_file():
            raise LoRAFormatError(f"'{path}' has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}")
        try:
            cfg = loads_strict(config_file.read_bytes(), config_file.name)
        except ValueError as e:
            raise LoRAFormatError(str(e)) from None
        if not isinstance(cfg, dict):
            raise LoRAFormatError(f"{config_file.name} must hold a JSON object")
    else:
        tensors, metadata = _read_safetensors(path)
        cfg = None
    try:
        meta = loads_strict(metadata.get("recycle", "{}"), f"{label}: the 'recycle' metadata")
    except ValueError as e:
        raise LoRAFormatError(str(e)) from None
    if not isinstance(meta, dict):
        raise LoRAFormatError(f"{label}: the 'recycle' metadata must be a JSON object, got {_shown(meta)}")
    if any(re.fullmatch(r"w_a_\d{3}", k) for k in tensors):
        return _from_official(tensors, label, backbone)
    if cfg is None:
        raise LoRAFormatError(f"{label}: a PEFT LoRA needs its {ADAPTER_CONFIG} next to it (put both in one "
                              "folder)")
    from .formats_transformers import from_transformers_peft, is_transformers_adapter

    if is_transformers_adapter(tensors):  # made on a transformers ViT or CLIP: mapped onto the timm ViT
        adapter = from_transformers_peft(cfg, tensors, label, path if path.is_dir() else None, backbone)
    else:
        adapter = _from_peft(cfg, tensors, meta, label)
    if adapter.backbone is None and path.is_dir():
        adapter.backbone = _card_base_model(path / "README.md")
    return adapter


def _card_base_model(card: Path) -> Optional[str]:
    """The ``base_model`` of a model card's metadata (the first, if several), or None."""
    from huggingface_hub.repocard import metadata_load

    if not card.is_file() or card.stat().st_size > 1 << 20:
        return None
    try:
        base = (metadata_load(card) or {}).get("base_model")
    except Exception:  # noqa: BLE001 - malformed YAML: the card just names no base
        return None
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and base.strip() else None



def load_lora(source: Union[str, Path], backbone=None, hub_only: bool = False) -> LoRAAdapter:
    """Load a LoRA from a local folder or file, or download it from the Hub by ``ORG/NAME`` id.

    Only ``*.json``, ``*.safetensors`` and ``*.md`` files are downloaded: pickles never leave the Hub.

    Args:
        hub_only: never read `source` from disk, even where a local folder of that name exists: it must be a Hub id
            (for servers whose users may not name local files).

    Raises:
        LoRAFormatError: unusable files (see `read_adapter`).
        HubError: malformed or unknown Hub id, or Hub unreachable with nothing cached.
    """
    from .hub import HubError, download_repo_files, is_repo_id

    if not hub_only:
        try:
            local = Path(source).expanduser()
            exists = local.exists()
        except (OSError, ValueError):  # NUL bytes, names too long for the filesystem: not a usable path
            exists = False
        if exists:
            return read_adapter(local, backbone)
    source = str(source).strip()
    if not is_repo_id(source):
        raise HubError(f"'{source}' is not a Hub id of the form ORG/NAME" if hub_only else
                       f"'{source}' is neither an existing local path nor a Hub id of the form ORG/NAME")
    folder = download_repo_files(source, ["*.json", "*.safetensors", "*.md"])
    if not any(folder.glob("*.safetensors")):
        raise LoRAFormatError(f"Hub repository '{source}' has no .safetensors LoRA weights (pickled .bin/.pt "
                              "weights are never downloaded or loaded)")
    return read_adapter(folder, backbone, source)

"""PEFT's ``adapter_config.json``, read defensively: the file names, the refusals (non-LoRA types, DoRA, biases) and
the scale settings (``r``, ``lora_alpha``, rsLoRA, ``rank_pattern`` and ``alpha_pattern``) every PEFT reader uses."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..adapter import LoRAFormatError
from ..lora_config import MAX_ALPHA
from ..io import loads_strict, shown

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ModulePattern",
    "check_peft_config",
    "low_rank_pair",
    "pattern_value",
    "peft_scale_settings",
    "read_peft_config",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_peft_config(path: Path) -> dict:
    """The JSON object in `path` (an ``adapter_config.json``), strictly parsed.

    Raises:
        LoRAFormatError: not strict JSON, or not an object.
    """
    try:
        cfg = loads_strict(path.read_bytes(), path.name)
    except ValueError as e:
        raise LoRAFormatError(str(e)) from None
    if not isinstance(cfg, dict):
        raise LoRAFormatError(f"{path.name} must hold a JSON object")
    return cfg


# PEFT matches a rank_pattern/alpha_pattern key K as the regex ``(.*\.)?(K)$`` against module names. Untrusted
# regexes can take exponential time, so only the keys PEFT itself and its users write are accepted: a module path
# (word characters and dots, ``.`` escaped or not), optionally anchored with ``^`` and ``$``. Each character is a
# single alternative, so checking a key is linear, and matching one is a fixed-length comparison.
_PATTERN_KEY = re.compile(r"\^?(?:[A-Za-z0-9_]|\\\.|\.)+\$?")
_MAX_PATTERN_KEY = 200
_MAX_PATTERNS = 1000


@dataclass(frozen=True)
class ModulePattern:
    """A PEFT pattern key in the accepted subset; ``chars`` holds None where an unescaped ``.`` matches any one
    character."""

    key: str
    chars: tuple
    anchored: bool

    @classmethod
    def parse(cls, key: object, field: str, name: str) -> "ModulePattern":
        if not isinstance(key, str) or not key or len(key) > _MAX_PATTERN_KEY or not _PATTERN_KEY.fullmatch(key):
            raise LoRAFormatError(
                f"{name}: {field} key {shown(key)} is not supported: keys must be module paths such as "
                "'blocks.0.attn.qkv' or 'fc2' (word characters and dots, optionally escaped as '\\.' and anchored "
                f"with '^' or '$', at most {_MAX_PATTERN_KEY} characters); other regular expressions are refused"
            )
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
    """A config number: an int (for ranks) or a positive number of at most `MAX_ALPHA` (for alphas); anything else
    is refused by name."""
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0 or (not integer and value > MAX_ALPHA):
        kind = "a positive integer" if integer else f"a positive number of at most {MAX_ALPHA:g}"
        raise LoRAFormatError(f"{name}: {field} must be {kind}, got {shown(value)}")
    return value


def _patterns(cfg: dict, field: str, name: str, integer: bool) -> list[tuple[ModulePattern, Union[int, float]]]:
    patterns = cfg.get(field) or {}
    if not isinstance(patterns, dict):
        raise LoRAFormatError(
            f"{name}: {field} must be an object mapping module names to values, got {shown(patterns)}"
        )
    if len(patterns) > _MAX_PATTERNS:
        raise LoRAFormatError(f"{name}: {field} has {len(patterns)} keys; at most {_MAX_PATTERNS}")
    return [
        (ModulePattern.parse(k, field, name), _number(v, f"{field}[{shown(k)}]", name, integer))
        for k, v in patterns.items()
    ]


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
        raise LoRAFormatError(f"{name}: 'lora_dropout' must be a number in [0, 1), got {shown(dropout)}")
    return bool(cfg.get("use_rslora")), r_default, alpha_default, rank_patterns, alpha_patterns, float(dropout)


def pattern_value(patterns: list[tuple[ModulePattern, Union[int, float]]], path: str, default):
    """PEFT's rule: the first key that matches the end of the module name gives its value."""
    for pattern, value in patterns:
        if pattern.matches(path):
            return value
    return default


def check_peft_config(cfg: dict, name: str) -> None:
    """Refuse what LoRA Recycle cannot use: non-LoRA PEFT types, DoRA and the other variants, trained biases."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LoRAFormatError(
            f"{name}: this is a PEFT '{cfg.get('peft_type')}' adapter, not LoRA; only LoRA adapters can be recycled"
        )
    refusals = {
        "use_dora": "DoRA",
        "lora_bias": "LoRA bias terms",
        "layer_replication": "layer replication",
        "target_parameters": "parameter targets",
        "use_qalora": "QALoRA",
    }
    for key, what in refusals.items():
        if cfg.get(key):
            raise LoRAFormatError(f"{name}: the adapter uses {what} ('{key}'), which LoRA Recycle does not support")
    if cfg.get("bias", "none") != "none":
        raise LoRAFormatError(f"{name}: the adapter trains biases (bias='{cfg['bias']}'), which is not supported")


def low_rank_pair(pair: dict, module: str, name: str) -> tuple:
    """``(lora_A, lora_B)`` of one module's PEFT tensors, checked to form a low-rank pair: both present, matrices,
    non-empty, ``A (r, in)`` and ``B (out, r)``.

    Raises:
        LoRAFormatError: naming the file `name` and the module.
    """
    if set(pair) != {"lora_A", "lora_B"}:
        raise LoRAFormatError(f"{name}: {module} has {sorted(pair)} but needs both lora_A and lora_B")
    a, b = pair["lora_A"], pair["lora_B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or not a.numel() or not b.numel():
        raise LoRAFormatError(
            f"{name}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not form a low-rank pair"
        )
    return a, b

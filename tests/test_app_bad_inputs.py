"""The bad-input suite: malformed inputs to every tab, each answered with a clear error, after which the app still
serves a good request. Two apps run: one as on a workstation (local paths allowed) and one as on a public Space
(``RECYCLE_ALLOW_LOCAL_PATHS=0``: only Hub ids and uploads)."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors.torch import load_file, save_file

from tests.support.apptools import (
    blank_png,
    classify,
    close,
    good_request,
    headless_lora,
    launch,
    make_pics,
    make_pool,
    official_lora,
    pattern,
    plain,
    publish,
    quick_good_request,
    settings,
    tiny_lora,
)


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tiny_clip_dir, tiny_vit_dir, tmp_path_factory):
    """Both apps, their clients, images, LoRA files and a pool, shared by every case."""
    root = tmp_path_factory.mktemp("bad-inputs")
    pics = make_pics(root)
    peft = tiny_lora(tiny_clip_dir, root / "colours")
    pool = make_pool(root / "pool", tiny_clip_dir, [peft])
    open_app = settings(root / "open", str(tiny_clip_dir))
    public_app = settings(root / "public", str(tiny_clip_dir), allow_local_paths=False)
    demo, client = launch(open_app)
    public_demo, public = launch(public_app)
    yield SimpleNamespace(
        root=root,
        pics=pics,
        peft=peft,
        pool=pool,
        client=client,
        public=public,
        clip_dir=tiny_clip_dir,
        official=official_lora(tiny_clip_dir, root / "official" / "task.safetensors"),
        headless=headless_lora(tiny_clip_dir, root / "headless"),
        vit_lora=tiny_lora(tiny_vit_dir, root / "vit-lora", steps=2),
    )
    close(demo, client)
    close(public_demo, public)


def _file(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def _truncated_png(tmp: Path) -> Path:
    pattern("red", 0, (200, 200)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    return _file(tmp, "cut.png", data[: len(data) // 2])


# ------------------------------------------------------------------------------------------------- request helpers
def _fewshot(w, classes, queries=None, client: Client = None, **extra):
    """/classify; `classes` is [(name, [pic keys or paths])]."""
    as_path = lambda p: w.pics[p] if isinstance(p, str) else p  # noqa: E731
    return classify(
        client or w.client,
        [(n, [as_path(p) for p in ps]) for n, ps in classes],
        [as_path(q) for q in (["red_q"] if queries is None else queries)],
        **extra,
    )


def _two(w, name1="red", name2="blue", **extra):
    return _fewshot(w, [(name1, ["red1"]), (name2, ["blue1"])], **extra)


def _load(w, hub_id="", files=(), client: Client = None):
    return (client or w.client).predict(
        hub_id=hub_id, files=[handle_file(str(f)) for f in files], api_name="/load_lora"
    )


def _invert(w, client: Client = None, classes=(0, 1), **overrides):
    args = dict(per_class=1, steps=10, pruning="-1:0.75", bn_prior=False, lr=0.25, seed=0)
    return (client or w.client).predict(classes=list(classes), **{**args, **overrides}, api_name="/invert")


def _peft_copy(w, tmp: Path, edit_config=None, edit_tensors=None, edit_meta=None, name="edited") -> Path:
    """A copy of the good PEFT LoRA, its config dict, tensors and 'recycle' metadata dict edited in place."""
    folder = shutil.copytree(w.peft, tmp / name)
    if edit_config is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        edit_config(config)
        (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if edit_tensors is not None or edit_meta is not None:
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        if edit_tensors is not None:
            edit_tensors(tensors)
        if edit_meta is not None:
            meta = json.loads(metadata["recycle"])
            edit_meta(meta)
            metadata["recycle"] = json.dumps(meta)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata)
    return folder


def _upload_peft(w, tmp, **edits):
    folder = _peft_copy(w, tmp, **edits)
    return _load(w, files=[folder / "adapter_config.json", folder / "adapter_model.safetensors"])


def _loaded_then(w, action: Callable):
    """Load the good LoRA in this session, then do `action`."""
    _load(w, files=[w.peft / "adapter_config.json", w.peft / "adapter_model.safetensors"])
    return action()


def _pool_copy(w, tmp: Path, corrupt: Callable[[Path], None]) -> Path:
    pool = shutil.copytree(w.pool, tmp / "pool")
    corrupt(next(p for p in pool.iterdir() if p.is_dir()))
    return pool


def _open_pool(w, folder, client: Client = None):
    return (client or w.client).predict(str(folder), api_name="/open_pool")


def _set_nan(tensors):
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key][0, 0] = float("nan")


def _scale(factor):
    def scale(tensors):
        for key in [k for k in tensors if "lora_" in k]:
            tensors[key] = tensors[key] * factor

    return scale


def _zero_size_rank(tensors):  # a few-KB file that declares rank 10^9
    for key in [k for k in tensors if "blocks.0.attn.qkv.lora_" in k]:
        tensors[key] = torch.zeros((10**9, 0) if "lora_A" in key else (0, 10**9))


def _long_block_index(tensors):
    for key in [k for k in tensors if ".blocks.0." in k]:
        tensors[key.replace(".blocks.0.", f".blocks.{'7' * 5000}.")] = tensors.pop(key)


def _config(**values):
    return dict(edit_config=lambda c: c.update(values))


def _meta(**values):
    return dict(edit_meta=lambda m: m.update(values))


REGEX = "(.*)*(.*)*(.*)*(.*)*!"


def _hub_peft(w, h, t, repo, **edits):
    """Publish an edited copy of the good LoRA to the fake Hub as `repo`, and load it there on the public app."""
    publish(h.root, repo, _peft_copy(w, t, **edits))
    return _load(w, hub_id=repo, client=w.public)


def _upload_deep_config(w, t):
    folder = _peft_copy(w, t)
    (folder / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000)
    return _load(w, files=[folder / "adapter_config.json", folder / "adapter_model.safetensors"])


def _hostile_backbone(w, t, edit=None, text=None) -> Path:
    """A copy of the tiny CLIP folder with its config.json edited (a dict edit, or raw text)."""
    folder = shutil.copytree(w.clip_dir, t / "hostile-vit")
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    if text is not None:
        (folder / "config.json").write_text(text)
    return folder


def _hub_backbone(w, h, t, repo, **edits):
    """Publish a hostile backbone to the fake Hub and use it as the backbone on the public app."""
    publish(h.root, repo, _hostile_backbone(w, t, **edits))
    return _two(w, backbone=f"hf-hub:{repo}", client=w.public)


# --------------------------------------------------------------------------------------------------------- the cases
# name -> (make the bad request from (world, tmp path, local hub), pattern its message must match)
CASES: dict[str, tuple[Callable, str]] = {
    # few-shot: classes and files
    "no classes": (lambda w, t, h: _fewshot(w, []), r"at least 2 classes.*got 0"),
    "one class": (lambda w, t, h: _fewshot(w, [("red", ["red1", "red2"])]), r"at least 2 classes.*got 1"),
    "class without images": (
        lambda w, t, h: _fewshot(w, [("red", ["red1"]), ("blue", [])]),
        r"class 'blue' has no images",
    ),
    "images without a name": (lambda w, t, h: _two(w, name1=""), r"Class 1 has 1 image\(s\) but no name"),
    "duplicate names": (lambda w, t, h: _two(w, name2=" red "), r"Classes 1 and 2 are both named 'red'"),
    "no queries": (
        lambda w, t, h: _fewshot(w, [("red", ["red1"]), ("blue", ["blue1"])], queries=[]),
        r"at least one query image",
    ),
    "text file named .png": (
        lambda w, t, h: _fewshot(w, [("red", ["red1"]), ("blue", [_file(t, "notes.png", b"hello")])]),
        r"class 'blue': notes\.png: not a recognised image",
    ),
    "wrong file type": (
        lambda w, t, h: _fewshot(
            w, [("red", ["red1"]), ("blue", ["blue1"])], queries=[_file(t, "notes.txt", b"hello")]
        ),
        r"Invalid file type",
    ),
    "zero-byte image": (
        lambda w, t, h: _fewshot(w, [("red", ["red1"]), ("blue", ["blue1"])], queries=[_file(t, "empty.jpg", b"")]),
        r"query empty\.jpg: the file is empty",
    ),
    "truncated image": (
        lambda w, t, h: _fewshot(w, [("red", ["red1"]), ("blue", ["blue1"])], queries=[_truncated_png(t)]),
        r"cut\.png: .*(corrupt|truncated)",
    ),
    "huge dimensions": (
        lambda w, t, h: _fewshot(w, [("red", ["red1"]), ("blue", [blank_png(t / "huge.png", 8000, 6000)])]),
        r"huge\.png: image is too large \(8000x6000",
    ),
    "decompression bomb": (
        lambda w, t, h: _fewshot(
            w, [("red", ["red1"]), ("blue", ["blue1"])], queries=[blank_png(t / "bomb.png", 20000, 20000)]
        ),
        r"bomb\.png: .*decompression bomb",
    ),
    # few-shot: class names with odd Unicode
    "name of zero-width characters only": (
        lambda w, t, h: _fewshot(w, [("\u200b\u200d\u2060", [])]),
        r"Class 1's name has only invisible characters",
    ),
    "name of bidi controls only": (
        lambda w, t, h: _two(w, name1="\u202e\u200f"),
        r"Class 1 has 1 image\(s\) but no name",
    ),
    "names equal but for a zero-width space": (
        lambda w, t, h: _two(w, name1="red", name2="re\u200bd"),
        r"Classes 1 and 2 are both named 'red'.*invisible characters",
    ),
    "names equal but for combining marks": (
        lambda w, t, h: _two(w, name1="caf\u00e9", name2="cafe\u0301"),
        r"Classes 1 and 2 are both named 'café'",
    ),
    "very long emoji name": (lambda w, t, h: _two(w, name1="🐱" * 81), r"Class 1's name is 81 characters long"),
    # few-shot: backbone and meta-LoRA fields
    "missing backbone folder": (
        lambda w, t, h: _two(w, backbone=str(t / "nowhere")),
        r"Backbone directory .*does not exist",
    ),
    "unknown backbone": (
        lambda w, t, h: _two(w, backbone="no_such_vit_model"),
        r"Unknown backbone 'no_such_vit_model'",
    ),
    "missing LoRA path": (
        lambda w, t, h: _two(w, lora=str(t / "nowhere")),
        r"neither an existing local path nor a Hub id",
    ),
    "pickled meta-LoRA": (lambda w, t, h: _two(w, lora=str(_file(t, "adapter.bin", b"\x80\x04K\x01."))), r"pickle"),
    "NUL byte in the LoRA field": (
        lambda w, t, h: _two(w, lora="org/na\x00me"),
        r"LoRA name contains control characters",
    ),
    "5000-character backbone name": (
        lambda w, t, h: _two(w, backbone="vit" * 1700),
        r"backbone name is 5100 characters long; at most 300",
    ),
    "LoRA path to a system file": (
        lambda w, t, h: _two(w, lora="../../../../../etc/passwd"),
        r"passwd is not a \.safetensors file",
    ),
    # public server: path-like strings in text fields
    "public: relative path as LoRA": (
        lambda w, t, h: _two(w, lora="../../etc/passwd", client=w.public),
        r"Local paths are disabled.*'\.\./\.\./etc/passwd'.*Hub id",
    ),
    "public: absolute path as LoRA": (
        lambda w, t, h: _two(w, lora="/etc/shadow", client=w.public),
        r"Local paths are disabled.*'/etc/shadow'",
    ),
    "public: folder as backbone": (
        lambda w, t, h: _two(w, backbone="/etc", client=w.public),
        r"Local paths are disabled.*'/etc' cannot be used as a backbone",
    ),
    "public: local-dir: backbone": (
        lambda w, t, h: _two(w, backbone="local-dir:/tmp", client=w.public),
        r"Local paths are disabled.*as a backbone",
    ),
    "public: path as inversion LoRA": (
        lambda w, t, h: _load(w, hub_id="/etc/shadow", client=w.public),
        r"Local paths are disabled.*'/etc/shadow' cannot be used as a LoRA",
    ),
    "public: another pool folder": (
        lambda w, t, h: _open_pool(w, "../../etc", client=w.public),
        r"Local paths are disabled.*Only the server's own pool can be browsed",
    ),
    "public: LoRA id shaped like a local folder": (
        lambda w, t, h: _two(w, lora="tests/helpers.py", client=w.public),
        r"Hub repository 'tests/helpers\.py' does not exist",
    ),
    # inversion: the Hub
    "malformed Hub id": (
        lambda w, t, h: _load(w, hub_id="not a repo!"),
        r"neither an existing local path nor a Hub id",
    ),
    "Hub id with too many parts": (
        lambda w, t, h: _load(w, hub_id="org/name/extra"),
        r"neither an existing local path nor a Hub id",
    ),
    "unknown Hub repo": (lambda w, t, h: _load(w, hub_id="recycle-test/missing"), r"does not exist, or it is private"),
    "Hub repo with pickles only": (
        lambda w, t, h: (
            _file(h.root / "recycle-test" / "pickled", "adapter_model.bin", b"\x80\x04K\x01.")
            if (h.root / "recycle-test" / "pickled").mkdir(parents=True) is None
            else None,
            _load(w, hub_id="recycle-test/pickled"),
        ),
        r"has no \.safetensors LoRA weights \(pickled",
    ),
    "Hub is down": (
        lambda w, t, h: (
            publish(h.root, "recycle-test/colours", w.peft),
            h.stop(),
            _load(w, hub_id="recycle-test/colours"),
        ),
        r"Hub at http://127\.0\.0\.1:\d+ is unreachable and the files are not cached",
    ),
    "BN prior not on the Hub": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, bn_prior=True)),
        r"BN prior: .*resnet50.*Untick 'BN-statistics prior'",
    ),
    # inversion: uploaded files
    "nothing to load": (lambda w, t, h: _load(w), r"Enter a Hub id \(ORG/NAME\) or upload"),
    "zero-byte weights": (
        lambda w, t, h: _load(w, files=[_file(t, "adapter_model.safetensors", b"")]),
        r"adapter_model\.safetensors is empty \(0 bytes\)",
    ),
    "truncated weights": (
        lambda w, t, h: _load(
            w, files=[_file(t, "adapter_model.safetensors", (w.peft / "adapter_model.safetensors").read_bytes()[:300])]
        ),
        r"not a valid safetensors file",
    ),
    "random bytes as weights": (
        lambda w, t, h: _load(w, files=[_file(t, "x.safetensors", bytes(range(256)) * 4)]),
        r"not a valid safetensors file",
    ),
    "pickled weights": (
        lambda w, t, h: _load(w, files=[_file(t, "adapter_model.bin", b"\x80\x04K\x01.")]),
        r"adapter_model\.bin: pickled weights are never loaded",
    ),
    "PEFT weights without their config": (
        lambda w, t, h: _load(w, files=[w.peft / "adapter_model.safetensors"]),
        r"needs its adapter_config\.json",
    ),
    "config only": (lambda w, t, h: _load(w, files=[w.peft / "adapter_config.json"]), r"no weights uploaded"),
    "config that is not JSON": (
        lambda w, t, h: _load(
            w, files=[_file(t, "adapter_config.json", b"{nope"), w.peft / "adapter_model.safetensors"]
        ),
        r"adapter_config\.json is not valid JSON",
    ),
    "non-LoRA PEFT type": (
        lambda w, t, h: _upload_peft(w, t, edit_config=lambda c: c.update(peft_type="IA3")),
        r"PEFT 'IA3' adapter, not LoRA",
    ),
    "NaN in the weights": (lambda w, t, h: _upload_peft(w, t, edit_tensors=_set_nan), r"contains NaN or Inf"),
    "two LoRAs at once": (
        lambda w, t, h: _load(w, files=[w.official, w.peft / "adapter_model.safetensors"]),
        r"upload one LoRA at a time",
    ),
    "LoRA without a head": (lambda w, t, h: _load(w, files=list(w.headless.iterdir())), r"no classification head"),
    "LoRA for another backbone": (
        lambda w, t, h: (_load(w, files=list(w.vit_lora.iterdir())), _invert(w)),
        r"does not fit the backbone",
    ),
    # inversion: settings
    "invert before loading": (
        lambda w, t, h: _invert(w, client=Client(w.client.src, verbose=False), classes=()),
        r"Load a LoRA first",
    ),
    "no classes chosen": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, classes=())),
        r"Choose at least one class",
    ),
    "class not in the LoRA": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, classes=(7,))),
        r"7.*is not in the list of choices",
    ),
    "too many images": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, classes=(0, 1, 2), per_class=11)),
        r"3 classes × 11 images = 33 images; at most 32",
    ),
    "too many steps": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, steps=50000)),
        r"Value 50000 is greater than maximum value 2000",
    ),
    "malformed pruning schedule": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, pruning="11:abc")),
        r"Pruning schedule '11:abc'.*LAYER:RATIO",
    ),
    "pruning ratio of 1.5": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, pruning="-1:1.5")),
        r"pruning ratio for layer -1 must be in \[0, 1\)",
    ),
    "pruning layer out of range": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, pruning="99:0.5")),
        r"pruning layer 99 is out of range for a model with 2 blocks",
    ),
    "negative learning rate": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, lr=-1)),
        r"Value -1 is less than minimum value 0\.001",
    ),
    # adversarial LoRA files: patterns, types, declared sizes
    "regex in rank_pattern": (
        lambda w, t, h: _upload_peft(w, t, **_config(rank_pattern={REGEX: 4})),
        r"rank_pattern key '\(\.\*\)\*.*' is not supported.*module paths",
    ),
    "regex in alpha_pattern": (
        lambda w, t, h: _upload_peft(w, t, **_config(alpha_pattern={"(a|aa)+$": 4})),
        r"alpha_pattern key .* is not supported",
    ),
    "invalid regex in rank_pattern": (
        lambda w, t, h: _upload_peft(w, t, **_config(rank_pattern={"blocks.(0": 4})),
        r"rank_pattern key 'blocks\.\(0' is not supported",
    ),
    "public: Hub LoRA with a regex pattern": (
        lambda w, t, h: _hub_peft(w, h, t, "recycle-test/regex", **_config(rank_pattern={REGEX: 4})),
        r"rank_pattern key .* is not supported",
    ),
    "r as a string": (lambda w, t, h: _upload_peft(w, t, **_config(r="8")), r"'r' must be a positive integer, got '8'"),
    "r as null": (lambda w, t, h: _upload_peft(w, t, **_config(r=None)), r"'r' must be a positive integer, got None"),
    "lora_alpha of 1e308": (
        lambda w, t, h: _upload_peft(w, t, **_config(lora_alpha=1e308)),
        r"'lora_alpha' must be a positive number of at most 1e\+06, got 1e\+308",
    ),
    "non-numeric lora_alpha": (
        lambda w, t, h: _upload_peft(w, t, **_config(lora_alpha="high")),
        r"'lora_alpha' must be a positive number of at most 1e\+06, got 'high'",
    ),
    "string where an object is expected": (
        lambda w, t, h: _upload_peft(w, t, **_config(rank_pattern="qkv")),
        r"rank_pattern must be an object",
    ),
    "peft_type as a list": (
        lambda w, t, h: _upload_peft(w, t, edit_config=lambda c: c.update(peft_type=[1])),
        r"PEFT '\[1\]' adapter, not LoRA",
    ),
    "200,000-deep JSON config": (
        lambda w, t, h: _upload_deep_config(w, t),
        r"adapter_config\.json is nested too deeply",
    ),
    "integer class names in the metadata": (
        lambda w, t, h: _upload_peft(w, t, **_meta(class_names=[1, 2, 3])),
        r"class names must be a list of strings, got \[1, 2, 3\]",
    ),
    "metadata config that is a string": (
        lambda w, t, h: _upload_peft(w, t, **_meta(config="qv")),
        r"the metadata's 'config' must be an object, got 'qv'",
    ),
    "5000-digit block index": (
        lambda w, t, h: _upload_peft(w, t, edit_tensors=_long_block_index),
        r"unsupported tensor 'base_model\.model\.blocks\.777.*block indices below 10000",
    ),
    "rank 10^9 from zero-size tensors": (
        lambda w, t, h: _upload_peft(w, t, edit_tensors=_zero_size_rank, **_config(rank_pattern={"qkv": 10**9})),
        r"lora_A \[1000000000, 0\] and lora_B \[0, 1000000000\].*low-rank pair",
    ),
    "rank 10^9 in the metadata": (
        lambda w, t, h: (_upload_peft(w, t, edit_meta=lambda m: m["config"].update(rank=10**9)), _invert(w)),
        r"metadata says rank 1000000000 for blocks\.0\.attn\.qkv, but its tensors have rank 4",
    ),
    "metadata targets fc1 over qkv tensors": (
        lambda w, t, h: _upload_peft(w, t, edit_meta=lambda m: m["config"].update(targets=["fc1"])),
        r"metadata names the targets fc1, but its tensors are LoRAs on qkv; .*inconsistent",
    ),
    "rank 100000 in the metadata over rank-4 tensors": (
        lambda w, t, h: _upload_peft(w, t, edit_meta=lambda m: m["config"].update(rank=100_000)),
        r"metadata says rank 100000 for blocks\.0\.attn\.qkv, but its tensors have rank 4; .*inconsistent",
    ),
    "LoRA scaled by 1e30": (
        lambda w, t, h: (_upload_peft(w, t, edit_tensors=_scale(1e30)), _invert(w)),
        r"teacher's (logits|loss) are not finite.*cannot be inverted",
    ),
    # inversion settings of the wrong type or out of range
    "seed of 2^63": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, seed=2**63)),
        r"seed must be a whole number from 0 to 9223372036854775807, got 9223372036854775808",
    ),
    "seed of 1e300": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, seed=1e300)),
        r"seed must be a whole number from 0 to 9223372036854775807",
    ),
    "pruning as a number": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, pruning=5)),
        r"token pruning setting .* must be text, got a number",
    ),
    "pruning as a list": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, pruning=["-1:0.75"])),
        r"token pruning setting .* must be text, got a list",
    ),
    "classes as a string": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, classes="01")),
        r"(classes must be a list|not in the list of choices)",
    ),
    # names
    "class name with a newline": (lambda w, t, h: _two(w, name1="red\nwine"), r"Class 1's name contains a line break"),
    "public: LOCAL-DIR: backbone": (
        lambda w, t, h: _two(w, backbone="LOCAL-DIR:/tmp", client=w.public),
        r"Local paths are disabled.*'LOCAL-DIR:/tmp' cannot be used as a backbone",
    ),
    "public: Local-Dir: backbone": (
        lambda w, t, h: _two(w, backbone="Local-Dir:/etc", client=w.public),
        r"Local paths are disabled.*as a backbone",
    ),
    "public: upper-case prefix on an existing folder": (
        lambda w, t, h: _two(w, backbone=f"LOCAL-DIR:{w.root}", client=w.public),
        r"Local paths are disabled",
    ),
    "backbone name timm cannot read": (
        lambda w, t, h: _two(w, backbone="file:/etc/passwd"),
        r"Unknown backbone 'file:/etc/passwd'",
    ),
    # backbone folders and Hub repos whose config.json describes a huge or wrong model (checked before building)
    "public: Hub backbone of depth 1000": (
        lambda w, t, h: _hub_backbone(w, h, t, "evil/deep-vit", edit=lambda c: c["model_args"].update(depth=1000)),
        r"hf-hub:evil/deep-vit.*config\.json: 'depth' is 1000, outside the accepted range 1 to 128",
    ),
    "backbone with img_size 10^9": (
        lambda w, t, h: _two(
            w, backbone=str(_hostile_backbone(w, t, edit=lambda c: c["model_args"].update(img_size=10**9)))
        ),
        r"config\.json: 'img_size' is 1000000000, outside the accepted range",
    ),
    "backbone of depth 10^6": (
        lambda w, t, h: _two(
            w, backbone=str(_hostile_backbone(w, t, edit=lambda c: c["model_args"].update(depth=10**6)))
        ),
        r"'depth' is 1000000, outside",
    ),
    "transformers config as the backbone": (
        lambda w, t, h: _two(w, backbone=str(_hostile_backbone(w, t, text='{"model_type": "vit"}'))),
        r"weights are in no known ViT layout",
    ),  # the transformers loader reads it, and finds timm's names
    "backbone weights with the wrong shapes": (
        lambda w, t, h: _two(
            w, backbone=str(_hostile_backbone(w, t, edit=lambda c: c["model_args"].update(embed_dim=32, num_heads=2)))
        ),
        r"model\.safetensors: tensor '.*' has shape \[.*\], but the model",
    ),
    # inversion settings sent as text through the API
    "steps as the text 'nan'": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, steps="nan")),
        r"Steps must be a finite number, got nan",
    ),
    "steps as the text 'many'": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, steps="many")),
        r"Steps must be a number, got 'many'",
    ),
    "learning rate 'inf'": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, lr="inf")),
        r"Learning rate \(Adam\) must be a finite number, got inf",
    ),
    "BN prior as the text 'false'": (
        lambda w, t, h: _loaded_then(w, lambda: _invert(w, bn_prior="false")),
        r"must be true or false, got the text 'false'",
    ),
    # pool
    "pool image outside the pool": (
        lambda w, t, h: _open_pool(w, _pool_copy(w, t, lambda r: _point_outside(r, t))),
        r"not a file inside the run",
    ),
    "NaN in a manifest": (
        lambda w, t, h: _open_pool(
            w,
            _pool_copy(
                w,
                t,
                lambda r: (r / "manifest.json").write_text(
                    (r / "manifest.json").read_text().replace('"logits": [\n', '"logits": [\nNaN, ', 1)
                ),
            ),
        ),
        r"unreadable manifest .*NaN is not a JSON number",
    ),
    "missing pool": (lambda w, t, h: _open_pool(w, t / "no-pool"), r"pool folder .* does not exist"),
    "empty pool": (lambda w, t, h: (t.joinpath("empty").mkdir(), _open_pool(w, t / "empty")), r"has no runs yet"),
    "run without manifest": (
        lambda w, t, h: _open_pool(w, _pool_copy(w, t, lambda r: (r / "manifest.json").unlink())),
        r"has no manifest\.json",
    ),
    "corrupt manifest": (
        lambda w, t, h: _open_pool(w, _pool_copy(w, t, lambda r: (r / "manifest.json").write_text("{truncated"))),
        r"unreadable manifest",
    ),
    "manifest of another format": (
        lambda w, t, h: _open_pool(
            w, _pool_copy(w, t, lambda r: (r / "manifest.json").write_text('{"format": "other"}'))
        ),
        r"not a surrogate-pool manifest",
    ),
    "modified pool image": (
        lambda w, t, h: _open_pool(
            w, _pool_copy(w, t, lambda r: pattern("red", 1, (32, 32)).save(r / "images" / "000000.png"))
        ),
        r"checksum mismatch",
    ),
    "9 MB manifest": (
        lambda w, t, h: _open_pool(
            w, _pool_copy(w, t, lambda r: _edit_manifest(r, lambda m: m["settings"].update(blob="x" * (9 << 20))))
        ),
        r"the manifest is [\d,]+ bytes, more than the "
        r"8,388,608 accepted",
    ),
    "200,000-item manifest": (
        lambda w, t, h: _open_pool(
            w, _pool_copy(w, t, lambda r: _edit_manifest(r, lambda m: m.update(items=[{}] * 200_000)))
        ),
        r"the manifest lists 200,000 images, more than the 5,000",
    ),
    "kept patches beyond the grid": (
        lambda w, t, h: _open_pool(
            w, _pool_copy(w, t, lambda r: _edit_manifest(r, lambda m: m["items"][0].update(kept=[10**6])))
        ),
        r"invalid kept \(patch indices must be distinct and below the \d+x\d+ grid",
    ),
    "teacher logit beyond float32": (
        lambda w, t, h: _open_pool(
            w, _pool_copy(w, t, lambda r: _edit_manifest(r, lambda m: m["items"][0]["logits"].__setitem__(0, 1e39)))
        ),
        r"invalid logits \(a teacher logit beyond float32's range\)",
    ),
    "pool image bomb with a valid checksum": (
        lambda w, t, h: _open_pool(w, _pool_copy(w, t, lambda r: _swap_image(r, _png_bomb()))),
        r"000000\.png is 10000x10000 pixels, but the run's images are 32x32",
    ),
    "text file as a pool image with a valid checksum": (
        lambda w, t, h: _open_pool(w, _pool_copy(w, t, lambda r: _swap_image(r, b"not an image at all"))),
        r"pool run '.*': images/000000\.png is not an image",
    ),
    "pool image deleted": (
        lambda w, t, h: _open_pool(w, _pool_copy(w, t, lambda r: (r / "masked" / "000001.png").unlink())),
        r"masked/000001\.png is listed in the manifest but missing",
    ),
}


def _edit_manifest(run: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    edit(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))


def _png_bomb() -> bytes:
    """A PNG of 10000 x 10000 black pixels (100 MP) in a few kilobytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return blank_png(Path(tmp) / "bomb.png", 10000, 10000).read_bytes()


def _swap_image(run: Path, data: bytes) -> None:
    """Replace the run's first image with `data`, and its checksum in the manifest with the new one."""
    import hashlib

    manifest = json.loads((run / "manifest.json").read_text())
    (run / manifest["items"][0]["image"]).write_bytes(data)
    manifest["items"][0]["sha256"]["image"] = hashlib.sha256(data).hexdigest()
    (run / "manifest.json").write_text(json.dumps(manifest))


def _point_outside(run: Path, tmp: Path) -> None:
    """Make the manifest name an image elsewhere on disk, with a matching checksum."""
    manifest = json.loads((run / "manifest.json").read_text())
    outside = tmp / "elsewhere.png"
    outside.write_bytes((run / manifest["items"][0]["image"]).read_bytes())
    manifest["items"][0]["image"] = str(outside)
    (run / "manifest.json").write_text(json.dumps(manifest))


# the names of the server's temporary and cache folders (tempfile's tmpXXXXXXXX, Gradio's uploads, the Hub cache)
SERVER_FOLDERS = re.compile(r"recycle-app-|/gradio/|\btmp[a-z0-9_]{8}\b|models--|snapshots/")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(world, tmp_path, local_hub, case):
    make, expected = CASES[case]
    with pytest.raises(AppError, match=expected) as err:
        make(world, tmp_path, local_hub)
    assert "Something went wrong" not in str(err.value) and "Traceback" not in str(err.value)
    assert not SERVER_FOLDERS.search(str(err.value)), str(err.value)
    client = world.public if case.startswith("public:") else world.client
    quick_good_request(client, world.pics)


def test_a_public_server_still_serves_hub_loras_and_its_own_defaults(world, local_hub):
    publish(local_hub.root, "recycle-test/colours", world.peft)
    card, _ = _load(world, hub_id="recycle-test/colours", client=world.public)
    assert "Loaded recycle-test/colours" in plain(card)
    card, _ = _load(world, files=[world.official], client=world.public)  # uploads are fine too
    assert "✅ Fits" in card
    assert world.public.predict(api_name="/status").startswith("✅")  # the configured backbone is trusted
    world.public.predict("", api_name="/refresh_pool")  # the server's own pool can be browsed
    good_request(world.public, world.pics)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads resident memory from /proc")
def test_memory_stays_bounded_under_adversarial_uploads_and_large_images(world, tmp_path):
    """60 uploads of hostile LoRAs and 10 images of 36 megapixels (108 MB each, decoded) leave the server within 100
    MB of its start.

    The app runs in this process, so this process's resident memory is the server's."""
    from PIL import Image

    w = world
    hostile = [
        _peft_copy(w, tmp_path, name="regex", **_config(rank_pattern={REGEX: 4})),
        _peft_copy(w, tmp_path, name="zero-size", edit_tensors=_zero_size_rank, **_config(rank_pattern={"qkv": 10**9})),
        _peft_copy(w, tmp_path, name="long-index", edit_tensors=_long_block_index),
        _peft_copy(w, tmp_path, name="huge-rank", edit_meta=lambda m: m["config"].update(rank=10**9)),
        _peft_copy(w, tmp_path, name="types", **_config(r=None, lora_alpha="x")),
    ]
    (tmp_path / "zero-size" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    large = [blank_png(tmp_path / "large.png", 6000, 6000), tmp_path / "large.jpg"]
    Image.new("RGB", (6000, 6000), (40, 60, 210)).save(large[1], quality=30)

    def upload(folder):  # every one of them is refused, with a message of its own
        with pytest.raises(AppError) as err:
            _load(w, files=[folder / "adapter_config.json", folder / "adapter_model.safetensors"])
        assert "Something went wrong" not in str(err.value)

    def large_request():  # 5 large queries: decoded for the model and for their thumbnails
        _fewshot(w, [("red", ["red1"]), ("blue", ["blue1"])], queries=[large[i % 2] for i in range(5)])

    for folder in hostile:  # warm up: caches, first-use allocations (but no large image: those must not stay)
        upload(folder)
    quick_good_request(w.client, w.pics)
    gc.collect()
    start = _rss_mb()
    for i in range(60):
        upload(hostile[i % len(hostile)])
    for _ in range(2):
        large_request()
    gc.collect()
    grown = _rss_mb() - start
    assert grown < 100, f"resident memory grew by {grown:.0f} MB"
    quick_good_request(w.client, w.pics)


def test_a_huge_page_link_gets_414_not_a_server_error(world):
    """A link over MAX_URL_LENGTH gets 414 from the app; one past the HTTP parser's own limit gets its 400."""
    import urllib.error
    import urllib.request

    from app_ui.limits import MAX_URL_LENGTH

    base = world.client.src.rstrip("/")
    assert urllib.request.urlopen(f"{base}/?tab=pool", timeout=30).status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{base}/?tab={'x' * (MAX_URL_LENGTH + 100)}", timeout=30)
    assert info.value.code == 414
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{base}/?tab={'x' * 100_000}", timeout=30)
    assert info.value.code in (400, 414)
    quick_good_request(world.client, world.pics)


def test_steps_as_numeric_text_are_read_as_numbers(world):
    """'1e1' is a number: the inversion runs with 10 steps."""
    _load(world, files=[world.peft / "adapter_config.json", world.peft / "adapter_model.safetensors"])
    _invert(world, steps="1e1", lr="0.25")


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads resident memory from /proc")
def test_hostile_pools_are_refused_before_any_bomb_is_decoded(world, tmp_path, monkeypatch):
    """Pools holding 100-megapixel PNG bombs (with valid checksums) are opened 10 times: no bomb is ever decoded (the
    server runs in this process, so every decode goes through PIL here), and the server keeps no more than 50 MB."""
    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load

    def counting_load(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    bombs = [_pool_copy(world, tmp_path / f"p{i}", lambda r: _swap_image(r, _png_bomb())) for i in range(2)]
    with pytest.raises(AppError):
        _open_pool(world, bombs[0])  # warm-up
    gc.collect()
    start = _rss_mb()
    for i in range(10):
        with pytest.raises(AppError, match=r"10000x10000 pixels, but the run's images are"):
            _open_pool(world, bombs[i % 2])
    gc.collect()
    assert _rss_mb() - start < 50
    assert (10000, 10000) not in decoded
    quick_good_request(world.client, world.pics)
    assert decoded  # the good request's images went through the counter: the bombs never did

"""Finding LoRAs on the Hub for a backbone, vetting them without downloading their weights, and gathering a zoo.

Discovery is huggingface_hub's ``list_models``: the repos tagged ``peft`` and ``base_model:adapter:<base>`` (the tag
the Hub derives from a card's ``base_model``), plus a name search for older adapters whose card names no base. Each
candidate is vetted from small files only: it must hold ``adapter_model.safetensors`` (pickles are never taken),
its ``adapter_config.json`` must be a plain LoRA (``bias: none``) on `base`, and the tensor names and shapes read from
the safetensors header (``parse_safetensors_file_metadata``, a ranged request) must hold LoRA pairs and a
classification head. Class names come from the repo's ``config.json`` ``id2label`` if it has one.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .hub import HubError, endpoint, hub_reachable
from .safetensors_header import DTYPE_BYTES

__all__ = ["HubLoRA", "find_hub_loras", "vet_hub_lora", "gather_zoo", "describe"]

_logger = logging.getLogger(__name__)

_MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20  # an adapter's safetensors header is a few kilobytes
MAX_CLASSES = 100_000  # a head with more outputs is refused before anything is sized by it
LORA_MB_ENV = "RECYCLE_HUB_MAX_LORA_MB"
DEFAULT_MAX_LORA_MB = 256
_VETTED: "OrderedDict[tuple, HubLoRA]" = OrderedDict()  # (repo, revision, base, tagged, size limit) -> the answer
_VETTED_SIZE = 512


def max_lora_bytes() -> int:
    """The largest adapter weights file a Hub listing accepts: ``RECYCLE_HUB_MAX_LORA_MB`` MiB (default 256).

    Raises:
        HubError: the setting is not a positive whole number.
    """
    raw = os.environ.get(LORA_MB_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_LORA_MB << 20
    if not raw.isdigit() or not 0 < int(raw) <= 1 << 20:
        raise HubError(f"{LORA_MB_ENV}={raw[:40]!r}: expected a whole number of MiB from 1 to {1 << 20}")
    return int(raw) << 20


@dataclass
class HubLoRA:
    """A Hub repository vetted as a LoRA for a backbone.

    Attributes:
        repo: ``ORG/NAME``.
        revision: the commit it was vetted at.
        base_model: the adapter config's ``base_model_name_or_path``.
        num_classes: outputs of its head (0: none).
        classes: class names (``id2label``), or None when the repo names none.
        problem: why it cannot be used, or None when it can.
        weights_bytes: the size of its adapter weights file (0 when unknown).
        bytes_read: what vetting read of its safetensors header from the Hub.
        datasets: the ``datasets`` its model card names, which say what its classes come from.
    """

    repo: str
    revision: Optional[str] = None
    base_model: Optional[str] = None
    num_classes: int = 0
    classes: Optional[list[str]] = None
    problem: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    weights_bytes: int = 0
    bytes_read: int = 0
    datasets: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.problem is None


def _small_json(api, repo: str, filename: str, revision: Optional[str]) -> Optional[dict]:
    """A small JSON file of the repo, or None when it is missing or not a JSON object."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import errors as hf_errors

    from .io import loads_strict

    try:  # the size first (a HEAD request), so that a huge "config" is never downloaded
        size = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=api.endpoint)).size
        if size is not None and size > _MAX_CONFIG_BYTES:
            return None
        path = Path(hf_hub_download(repo, filename, revision=revision, endpoint=api.endpoint))
    except (hf_errors.EntryNotFoundError, hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        return None
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        return None
    try:
        value = loads_strict(path.read_bytes(), f"{repo}: {filename}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def vet_hub_lora(
    api,
    repo: str,
    base: str,
    revision: Optional[str] = None,
    siblings: Optional[list[str]] = None,
    tagged: bool = False,
) -> HubLoRA:
    """Vet Hub repo `repo` as a LoRA with a head for backbone `base`, reading only its JSON files and the header of
    its safetensors file. Never raises for a bad candidate: the answer's ``problem`` says what is wrong.

    `tagged`: the Hub tags it ``base_model:adapter:<base>`` (its card names `base`), which stands in for an adapter
    config whose ``base_model_name_or_path`` is a path on its author's machine.

    Answers are cached per revision, so a repeated listing asks the Hub nothing more about a vetted commit.

    Raises:
        HubError: the Hub cannot be reached.
    """
    key = (repo, revision, base, tagged, max_lora_bytes())
    if revision is not None and key in _VETTED:
        _VETTED.move_to_end(key)
        return copy.deepcopy(_VETTED[key])
    found = _vet(api, repo, base, revision, siblings, tagged)
    if found.revision is not None:
        _VETTED[(repo, found.revision, base, tagged, key[-1])] = copy.deepcopy(found)
        while len(_VETTED) > _VETTED_SIZE:
            _VETTED.popitem(last=False)
    return found


def _vet(api, repo: str, base: str, revision: Optional[str], siblings: Optional[list[str]], tagged: bool) -> HubLoRA:
    from huggingface_hub import errors as hf_errors

    from .formats import ADAPTER_WEIGHTS, tensor_key_kind
    from .io import shown
    from .provenance import canonical_ids
    from .safetensors_header import HeaderError, check_entries, fetch_hub_header
    from .transformers_vit import label_names

    found = HubLoRA(repo, revision)
    try:
        if siblings is None:
            info = api.model_info(repo, revision=revision)
            siblings = [s.rfilename for s in info.siblings or []]
            found.revision = info.sha
        if "adapter_model.safetensors" not in siblings:
            pickled = [s for s in siblings if s.endswith((".bin", ".pt", ".pth"))]
            found.problem = (
                "its weights are only a pickle (" + ", ".join(pickled) + "), which is never loaded"
                if pickled
                else "it has no adapter_model.safetensors"
            )
            return found
        cfg = _small_json(api, repo, "adapter_config.json", found.revision)
        if cfg is None:
            found.problem = "it has no readable adapter_config.json"
            return found
        found.base_model = (
            cfg.get("base_model_name_or_path") if isinstance(cfg.get("base_model_name_or_path"), str) else None
        )
        if str(cfg.get("peft_type", "")).upper() != "LORA":
            found.problem = f"it is a PEFT {str(cfg.get('peft_type'))[:20]!r} adapter, not LoRA"
            return found
        if cfg.get("bias", "none") != "none" or cfg.get("use_dora"):
            found.problem = "it trains biases or uses DoRA, which LoRA Recycle does not support"
            return found
        named = canonical_ids(found.base_model)
        if tagged and not named:  # e.g. "/content/vit-base" in the config, the Hub id in the card
            found.base_model = base
        elif not named & canonical_ids(base):
            found.problem = f"it was made for {found.base_model!r}, not {base!r}"
            return found
        header, data_size, read = fetch_hub_header(api, repo, ADAPTER_WEIGHTS, found.revision, MAX_HEADER_BYTES)
        found.bytes_read += read
        entries = check_entries(header, data_size, f"{repo}: {ADAPTER_WEIGHTS}")
        found.weights_bytes = (
            data_size
            if data_size is not None
            else sum(math.prod(shape) * DTYPE_BYTES[dtype] for shape, dtype in entries.values())
        )
        if found.weights_bytes > max_lora_bytes():
            found.problem = (
                f"its weights hold {found.weights_bytes / 2**20:,.0f} MiB, more than the {max_lora_bytes() >> 20} "
                f"MiB accepted ({LORA_MB_ENV})"
            )
            return found
        kinds = {name: tensor_key_kind(name) for name in entries}
        unknown = [name for name, kind in kinds.items() if kind is None]
        if unknown:
            found.problem = f"its safetensors file holds a tensor no LoRA reader takes: {shown(unknown[0], 100)}"
            return found
        if "lora" not in kinds.values():
            found.problem = "its safetensors file holds no LoRA pairs"
            return found
        heads = [entries[n][0] for n, kind in kinds.items() if kind == "head" and n.endswith("weight")]
        if not heads or len(heads[0]) != 2:
            found.problem = "it has no classification head (nothing to invert)"
            return found
        if heads[0][0] > MAX_CLASSES:
            found.problem = f"its head declares {heads[0][0]:,} classes, more than the {MAX_CLASSES:,} accepted"
            return found
        found.num_classes = int(heads[0][0])
        if "config.json" in siblings:
            found.classes = label_names(_small_json(api, repo, "config.json", found.revision) or {}, found.num_classes)
    except HeaderError as e:
        found.problem = f"its safetensors header is refused: {e}"
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        found.problem = "the repository or revision does not exist"
    except hf_errors.EntryNotFoundError:
        found.problem = f"its {ADAPTER_WEIGHTS} cannot be fetched"
    except hf_errors.HfHubHTTPError as e:
        found.problem = f"the Hub refused a request ({str(e).splitlines()[0][:80]})"
    return found


def find_hub_loras(
    base: str, search: Optional[str] = None, limit: int = 20, include_unusable: bool = False, api=None
) -> list[HubLoRA]:
    """LoRAs with a head for backbone `base` (a Hub id such as ``google/vit-base-patch16-224-in21k``) on the Hub,
    vetted, most downloaded first.

    Args:
        search: also search repo names for this text (default: the name part of `base`, which old adapters repeat).
        limit: the most candidates vetted.
        include_unusable: also return the candidates that failed vetting (with their ``problem``).

    Raises:
        HubError: the Hub cannot be reached, or `base` is not a Hub id.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    from .hub import is_repo_id
    from .io import shown
    from .provenance import canonical_ids
    from .transformers_vit import label_names

    base = base.strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        base = base[len(prefix) :] if base.lower().startswith(prefix) else base
    base = base.split("@")[0]
    # A timm name or Hub id with known equivalents (`provenance.EQUIVALENT`) finds the LoRAs of each.
    bases = [b for b in dict.fromkeys([base, *sorted(canonical_ids(base))]) if is_repo_id(b)]
    if not bases:
        raise HubError(f"'{base}' is not a Hub id of the form ORG/NAME; LoRAs on the Hub name their base by Hub id")
    base = next((b for b in bases if not b.startswith("timm/")), bases[0])
    if not hub_reachable():
        raise HubError(f"the Hugging Face Hub at {endpoint()} cannot be reached, so no LoRAs can be listed now")
    api = api or HfApi(endpoint=endpoint())
    expand = ["siblings", "sha", "tags", "downloads"]
    seen: dict[str, object] = {}
    try:
        queries = [dict(filter=["peft", f"base_model:adapter:{b}"]) for b in bases]
        queries.append(dict(filter=["peft"], search=search or base.split("/")[1]))
        for query in queries:
            for model in api.list_models(**query, sort="downloads", limit=limit * 2, expand=expand):
                seen.setdefault(model.id, model)
        ranked = sorted(seen.values(), key=lambda m: (-(m.downloads or 0), str(m.id)))[:limit]
        found = []
        base_config: Optional[dict] = None
        for model in ranked:
            if not (isinstance(model.id, str) and is_repo_id(model.id)):  # a listing is Hub content too
                _logger.warning("skipping a listed repository with an invalid id: %s", shown(model.id, 80))
                if include_unusable:
                    found.append(HubLoRA(shown(model.id, 80), problem="its id is not a valid Hub id"))
                continue
            siblings = [s.rfilename for s in model.siblings or []]
            tagged = any(f"base_model:adapter:{b}" in (model.tags or []) for b in bases)
            lora = vet_hub_lora(api, model.id, base, model.sha, siblings, tagged=tagged)
            lora.tags = list(model.tags or [])
            lora.datasets = [t.split(":", 1)[1] for t in lora.tags if isinstance(t, str) and t.startswith("dataset:")]
            if lora.usable and lora.classes is None:  # the base's id2label, when it has as many classes
                if base_config is None:
                    base_config = _small_json(api, base, "config.json", None) or {}
                lora.classes = label_names(base_config, lora.num_classes)
            if lora.usable or include_unusable:
                found.append(lora)
            _logger.info("%s: %s", model.id, lora.problem or f"{lora.num_classes} classes")
    except hf_errors.HfHubHTTPError as e:
        raise HubError(f"listing LoRAs for '{base}' on the Hub failed: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - connection failures come from the client's HTTP library
        if isinstance(e, OSError) or "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise HubError(f"the Hugging Face Hub at {endpoint()} stopped answering ({type(e).__name__})") from None
        raise
    return found


def gather_zoo(
    base: str,
    out: Union[str, Path],
    limit: int = 20,
    search: Optional[str] = None,
    progress: Optional[Callable[[HubLoRA], None]] = None,
) -> dict:
    """Download the LoRAs `find_hub_loras` finds for `base` into zoo folder `out` (one subfolder per repo, its
    ``adapter_config.json``, ``adapter_model.safetensors`` and ``config.json`` at the vetted revision) and write
    ``zoo.json`` (each LoRA's repo, revision and classes). LoRAs already in the folder are kept.

    Only vetted repos are downloaded, each file once, straight into its folder (not also into the Hub cache); a
    folder whose LoRA the full reader then refuses is deleted. The manifest's ``bytes_moved`` counts the header reads
    of every candidate and the downloaded files (not the small JSON files vetting reads).

    Returns:
        The zoo manifest.

    Raises:
        HubError: the Hub cannot be reached, or no usable LoRA was found.
    """
    import shutil

    from huggingface_hub import hf_hub_download

    from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
    from .io import atomic_write_bytes, dumps_strict
    from .zoo import ZOO_MANIFEST

    out = Path(out)
    candidates = find_hub_loras(base, search=search, limit=limit, include_unusable=True)
    moved = sum(c.bytes_read for c in candidates)
    loras = [c for c in candidates if c.usable]
    if not loras:
        raise HubError(f"no usable LoRA with a classification head was found on the Hub for '{base}'")
    entries = []
    for lora in loras:
        name = lora.repo.replace("/", "--")
        folder = out / name
        if not (folder / ADAPTER_CONFIG).is_file():
            try:
                if lora.classes:  # the class names found while vetting, where the reader looks for them
                    labels = {str(i): c for i, c in enumerate(lora.classes)}
                    atomic_write_bytes(folder / "config.json", dumps_strict({"id2label": labels}, indent=1).encode())
                for filename in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # the config last: it marks a complete folder
                    path = Path(hf_hub_download(lora.repo, filename, revision=lora.revision, local_dir=folder))
                    moved += path.stat().st_size
            except Exception:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        try:
            adapter = read_adapter(folder, name=lora.repo)  # the whole file, checked as any LoRA is
        except ValueError as e:
            _logger.warning("skipping %s: %s", lora.repo, e)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        entries.append(
            {
                "name": name,
                "repo": lora.repo,
                "revision": lora.revision,
                "classes": adapter.class_names,
                "base_model": lora.base_model,
                **({"datasets": lora.datasets} if lora.datasets else {}),
            }
        )
        if progress is not None:
            progress(lora)
    if not entries:
        raise HubError(f"none of the LoRAs found for '{base}' could be read")
    manifest = {
        "format": "recycle-zoo",
        "version": 1,
        "backbone": base,
        "source": "hub",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bytes_moved": moved,
        "loras": entries,
    }
    atomic_write_bytes(out / ZOO_MANIFEST, dumps_strict(manifest, indent=1).encode())
    return manifest


def describe(loras: list[HubLoRA]) -> str:
    """One line per LoRA, for logs and the command line; every text from the Hub is made terminal-safe."""
    from .io import terminal_safe

    def classes(x: HubLoRA) -> str:
        names = f"{', '.join(c[:40] for c in x.classes[:5])}{'...' if len(x.classes) > 5 else ''}" if x.classes else ""
        source = f"from {', '.join(d[:80] for d in x.datasets[:3])}" if x.datasets else ""
        return f" ({'; '.join(p for p in (names, source) if p)})" if names or source else ""

    return "\n".join(
        terminal_safe(f"{x.repo}@{(x.revision or '')[:8]}: " + (x.problem or f"{x.num_classes} classes{classes(x)}"))
        for x in loras
    )

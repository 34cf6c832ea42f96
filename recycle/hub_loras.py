"""Finding LoRAs on the Hub for a backbone, vetting them without downloading their weights, and gathering a zoo.

Discovery is huggingface_hub's ``list_models``: the repos tagged ``peft`` and ``base_model:adapter:<base>`` (the tag
the Hub derives from a card's ``base_model``), plus a name search for older adapters whose card names no base. Each
candidate is vetted from small files only: it must hold ``adapter_model.safetensors`` (pickles are never taken),
its ``adapter_config.json`` must be a plain LoRA (``bias: none``) on `base`, and the tensor names and shapes read from
the safetensors header (``parse_safetensors_file_metadata``, a ranged request) must hold LoRA pairs and a
classification head. Class names come from the repo's ``config.json`` ``id2label`` if it has one.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .hub import HubError, endpoint, hub_reachable

__all__ = ["HubLoRA", "find_hub_loras", "vet_hub_lora", "gather_zoo", "describe"]

_logger = logging.getLogger(__name__)

_HEAD_KEYS = re.compile(r"(?:base_model\.model\.)?(?:classifier|head|head\.fc)(?:\.modules_to_save\.default)?\.weight")
_MAX_CONFIG_BYTES = 1 << 20


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
    """

    repo: str
    revision: Optional[str] = None
    base_model: Optional[str] = None
    num_classes: int = 0
    classes: Optional[list[str]] = None
    problem: Optional[str] = None
    tags: list[str] = field(default_factory=list)

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
    except hf_errors.EntryNotFoundError:
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

    Raises:
        HubError: the Hub cannot be reached.
    """
    from huggingface_hub import errors as hf_errors

    from .formats import is_transformers_adapter
    from .provenance import canonical_ids
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
        header = api.parse_safetensors_file_metadata(
            repo, filename="adapter_model.safetensors", revision=found.revision
        )
        shapes = {name: list(info.shape) for name, info in header.tensors.items()}
        heads = [shape for name, shape in shapes.items() if _HEAD_KEYS.fullmatch(name) and len(shape) == 2]
        has_lora = any(".lora_A." in name for name in shapes)
        if not has_lora:
            found.problem = "its safetensors file holds no LoRA pairs"
            return found
        if not heads:
            found.problem = "it has no classification head (nothing to invert)"
            return found
        if not (
            is_transformers_adapter(shapes)
            or any(re.match(r"(?:base_model\.model\.)?(?:timm_model\.)?blocks\.", n) for n in shapes)
        ):
            found.problem = "its tensors are not on ViT blocks"
            return found
        found.num_classes = int(heads[0][0])
        if "config.json" in siblings:
            found.classes = label_names(_small_json(api, repo, "config.json", found.revision) or {}, found.num_classes)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        found.problem = "the repository or revision does not exist"
    except (hf_errors.SafetensorsParsingError, hf_errors.NotASafetensorsRepoError) as e:
        found.problem = f"its safetensors header cannot be read ({type(e).__name__})"
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
    from .transformers_vit import label_names

    base = base.strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        base = base[len(prefix) :] if base.lower().startswith(prefix) else base
    base = base.split("@")[0]
    if not is_repo_id(base):
        raise HubError(f"'{base}' is not a Hub id of the form ORG/NAME; LoRAs on the Hub name their base by Hub id")
    if not hub_reachable():
        raise HubError(f"the Hugging Face Hub at {endpoint()} cannot be reached, so no LoRAs can be listed now")
    api = api or HfApi(endpoint=endpoint())
    expand = ["siblings", "sha", "tags", "downloads"]
    seen: dict[str, object] = {}
    try:
        queries = [
            dict(filter=["peft", f"base_model:adapter:{base}"]),
            dict(filter=["peft"], search=search or base.split("/")[1]),
        ]
        for query in queries:
            for model in api.list_models(**query, sort="downloads", limit=limit * 2, expand=expand):
                seen.setdefault(model.id, model)
        ranked = sorted(seen.values(), key=lambda m: (-(m.downloads or 0), m.id))[:limit]
        found = []
        base_config: Optional[dict] = None
        for model in ranked:
            siblings = [s.rfilename for s in model.siblings or []]
            lora = vet_hub_lora(
                api, model.id, base, model.sha, siblings, tagged=f"base_model:adapter:{base}" in (model.tags or [])
            )
            lora.tags = list(model.tags or [])
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
    ``zoo.json`` (each LoRA's repo, revision and classes). LoRAs already in the folder are kept; every file is written
    atomically, the adapter config last.

    Returns:
        The zoo manifest.

    Raises:
        HubError: the Hub cannot be reached, or no usable LoRA was found.
    """
    from huggingface_hub import hf_hub_download

    from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
    from .io import atomic_write_bytes, dumps_strict
    from .zoo import ZOO_MANIFEST

    out = Path(out)
    loras = find_hub_loras(base, search=search, limit=limit)
    if not loras:
        raise HubError(f"no usable LoRA with a classification head was found on the Hub for '{base}'")
    entries = []
    for lora in loras:
        name = lora.repo.replace("/", "--")
        folder = out / name
        if not (folder / ADAPTER_CONFIG).is_file():
            if lora.classes:  # the class names found while vetting, where the reader looks for them
                labels = {str(i): c for i, c in enumerate(lora.classes)}
                atomic_write_bytes(folder / "config.json", dumps_strict({"id2label": labels}, indent=1).encode())
            for filename in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                path = hf_hub_download(lora.repo, filename, revision=lora.revision)
                atomic_write_bytes(folder / filename, Path(path).read_bytes())
        try:
            adapter = read_adapter(folder, name=lora.repo)  # the whole file, checked as any LoRA is
        except ValueError as e:
            _logger.warning("skipping %s: %s", lora.repo, e)
            continue
        entries.append(
            {
                "name": name,
                "repo": lora.repo,
                "revision": lora.revision,
                "classes": adapter.class_names,
                "base_model": lora.base_model,
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
        "loras": entries,
    }
    atomic_write_bytes(out / ZOO_MANIFEST, dumps_strict(manifest, indent=1).encode())
    return manifest


def describe(loras: list[HubLoRA]) -> str:
    """One line per LoRA, for logs and the command line."""
    return "\n".join(
        f"{x.repo}@{(x.revision or '')[:8]}: "
        + (
            x.problem
            or f"{x.num_classes} classes"
            + (f" ({', '.join(x.classes[:5])}{'...' if len(x.classes) > 5 else ''})" if x.classes else "")
        )
        for x in loras
    )

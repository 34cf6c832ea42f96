"""The inversion tab's Hub LoRA list: the vetted Hub LoRAs with a head for the selected backbone."""

from __future__ import annotations

import threading
import time
from typing import Optional

import gradio as gr

from .errors import reported, text_field, user_text
from .markup import md_code, md_text
from .settings import PathPolicy

__all__ = ["HubLoRAList"]


class HubLoRAList:
    """ "LoRAs on the Hub for this backbone": the vetted Hub LoRAs with a head for the selected backbone, searchable
    by name, cached for a while per (backbone, search); an unreachable Hub is a message, not an error."""

    TTL = 600.0  # seconds a listing is reused
    SIZE = 32  # listings kept

    def __init__(self, policy: PathPolicy, default_backbone: str, limit: int = 20):
        self.policy = policy
        self.default_backbone = default_backbone
        self.limit = limit
        self._cache: dict[tuple[str, str], tuple[float, list]] = {}
        self._lock = threading.Lock()

    def _listing(self, base: str, text: str) -> list:
        from recycle.hub_loras import find_hub_loras

        key = (base, text.lower())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.TTL:
                return hit[1]
        found = find_hub_loras(base, search=text or None, limit=self.limit)
        if text:  # the tagged listing holds every LoRA for the base: keep those whose name matches
            found = [x for x in found if text.lower() in x.repo.lower()]
        with self._lock:
            if len(self._cache) >= self.SIZE:
                self._cache.pop(min(self._cache, key=lambda k: self._cache[k][0]))
            self._cache[key] = (time.monotonic(), found)
        return found

    def search(self, backbone: Optional[str], text: Optional[str]) -> tuple[str, dict]:
        """The listing as markdown and the choices of the picker (each choice fills the Hub id field)."""
        from recycle.backbone import hub_repo_id
        from recycle.hub import HubError

        with reported("Cannot list the Hub's LoRAs", "listing the Hub's LoRAs"):
            name = self.policy.backbone(text_field(backbone, "backbone name") or self.default_backbone)
            text = text_field(text, "search text")
            base = hub_repo_id(name)
            if base is None:
                return (
                    f"The backbone {md_code(name)} is not a Hub model, and LoRAs on the Hub name their base by "
                    "Hub id: choose a Hub backbone (e.g. `hf-hub:google/vit-base-patch16-224-in21k`) to list "
                    "LoRAs for it.",
                    gr.update(choices=[], value=None),
                )
            try:
                found = self._listing(base, text)
            except HubError as e:
                return f"⚠️ {md_text(user_text(e), 1000)}", gr.update(choices=[], value=None)
            if not found:
                none = f"No LoRA with a classification head was found on the Hub for {md_code(base)}" + (
                    f" whose name contains {md_code(text)}." if text else "."
                )
                return none, gr.update(choices=[], value=None)
            rows = [f"| {md_code(x.repo)} | {x.num_classes} | {_names(x)} |" for x in found]
            table = "\n".join(
                [
                    f"{len(found)} LoRAs for {md_code(base)} (vetted: safetensors, LoRA, a head). Pick one "
                    "to fill in the Hub id, then press **Load LoRA**.",
                    "",
                    "| repository | classes | names |",
                    "|---|---|---|",
                    *rows,
                ]
            )
            return table, gr.update(
                choices=[(f"{x.repo} · {x.num_classes} classes", x.repo) for x in found], value=None
            )


def _names(lora) -> str:
    """A listing's names cell: the first class names, or, where the LoRA names none, the datasets its card names
    (what its classes come from), never invented names."""
    source = "; from " + ", ".join(md_code(d[:80]) for d in lora.datasets[:3]) if lora.datasets else ""
    if lora.classes:
        names = ", ".join(c[:40] for c in lora.classes[:6]) + ("…" if len(lora.classes) > 6 else "")
        return md_text(names) + source
    return "unnamed" + source

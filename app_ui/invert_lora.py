"""Loading the LoRA to invert: from the Hub or an upload, checked against the selected backbone, with an offer to
switch to the backbone it was made for."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gradio as gr

from recycle.backbone import Backbone
from recycle.formats import LoRAAdapter, LoRAFormatError, read_adapter, stage_lora_files
from recycle.provenance import fit_mismatch

from .errors import InputError, file_paths, reported, text_field, user_text
from .limits import MAX_LORA_FILES, SESSIONS
from .markup import md_code, md_text
from .settings import AppSettings, PathPolicy
from .state import ModelCache, SessionStore, session_id


@dataclass
class LoadedLoRA:
    adapter: LoRAAdapter
    source: str  # Hub id, path, or "upload: <file names>"
    backbone: str  # the backbone it was loaded (and checked) for
    made_for: Optional[str] = None  # the backbone it names, when that is not the selected one and may be chosen
    mismatch: Optional[str] = None  # why it was made for another base (`provenance.fit_mismatch`), or None


class LoRALoading:
    """The inversion tab's loading handlers, and the LoRA each session loaded (`loras`)."""

    def __init__(self, cache: ModelCache, policy: PathPolicy, settings: AppSettings, default_backbone: str):
        self.cache = cache
        self.policy = policy
        self.settings = settings
        self.default_backbone = default_backbone
        self.loras: SessionStore[LoadedLoRA] = SessionStore(SESSIONS)
        self._tmp = Path(tempfile.mkdtemp(prefix="recycle-app-"))

    def _backbone_name(self, backbone: Optional[str]) -> str:
        return self.policy.backbone(text_field(backbone, "backbone name") or self.default_backbone)

    def load(
        self, backbone: Optional[str], hub_id: Optional[str], files: Optional[list[str]], request: gr.Request = None
    ) -> tuple[str, dict]:
        """Load the LoRA to invert: the uploaded files if any, else the Hub id. Shows its backbone and classes.

        Returns:
            The LoRA's card (markdown) and an update of the class checkboxes.
        """
        with reported("Cannot load the LoRA", "loading the LoRA"):
            name = self._backbone_name(backbone)
            uploads = file_paths(files)
            hub_id = text_field(hub_id, "LoRA name")
            if not uploads and not hub_id:
                raise InputError("Enter a Hub id (ORG/NAME) or upload the LoRA's files first.")
            model = self.cache.backbone(name)  # needed to map an official file's head, and to check the fit
            if uploads:
                uploaded = next((Path(f).name for f in uploads if f.endswith(".safetensors")), "LoRA")
                source = "upload:" + uploaded
                with tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
                    adapter = read_adapter(stage_lora_files(uploads, Path(tmp), MAX_LORA_FILES), model, uploaded)
            else:
                source = hub_id
                adapter = self.policy.load_lora(hub_id, model)
            if adapter.head_weight is None:
                raise LoRAFormatError(
                    "This LoRA has no classification head, so there is nothing to invert (a "
                    "meta-LoRA, for example, has none). Load a LoRA tuned with a head."
                )
            fit, mismatch = self._fit(adapter, model, name)
            self.loras.set(
                session_id(request), LoadedLoRA(adapter, source, name, self._offer(adapter, name, fit), mismatch)
            )
            names = adapter.class_names or []
            c = adapter.config
            card = "\n".join(
                [
                    f"**Loaded** {md_code(source)}: {len(names)} classes; LoRA on "
                    f"{md_text(', '.join(c.targets))}, rank {c.rank}, scale {c.scaling:g}; made for backbone "
                    f"{md_code(adapter.backbone or 'unknown')}.",
                    "",
                    fit,
                    "",
                    "**Classes:** " + ", ".join(f"<bdi>{md_text(n)}</bdi>" for n in names),
                ]
            )
            choices = [(n, i) for i, n in enumerate(names)]
            return card, gr.update(
                choices=choices,
                value=[i for _, i in choices[:2]],
                info=f"{len(choices)} classes; fewer classes and images make a quicker run.",
            )

    def _offer(self, adapter: LoRAAdapter, name: str, fit: str) -> Optional[str]:
        """The backbone to offer to switch to: the one the LoRA names, when it does not fit the selected one and the
        path policy lets a user choose it."""
        if fit.startswith("✅") or not adapter.backbone or adapter.backbone == name:
            return None
        try:
            return self.policy.backbone(adapter.backbone)
        except InputError:  # e.g. a local folder on a server whose users may not name one
            return None

    def switch_offer(self, request: gr.Request = None) -> dict:
        """The "switch the backbone" button: shown, naming the backbone, when the session's LoRA was made for another
        one that can be chosen."""
        loaded = self.loras.get(session_id(request))
        made_for = loaded.made_for if loaded is not None else None
        return gr.update(
            visible=made_for is not None,
            value=f"Switch the backbone to {made_for}" if made_for else "Switch the backbone",
        )

    def switch_backbone(self, backbone: Optional[str], request: gr.Request = None) -> str:
        """The backbone the session's LoRA was made for (the current one when there is none to switch to)."""
        loaded = self.loras.get(session_id(request))
        return loaded.made_for if loaded is not None and loaded.made_for else (backbone or self.default_backbone)

    @staticmethod
    def _fit(adapter: LoRAAdapter, model: Backbone, name: str) -> tuple[str, Optional[str]]:
        """What the card says of the LoRA's fit, and why it was made for another base when its shapes fit but
        `provenance.fit_mismatch` says so (None otherwise)."""
        try:
            with adapter.attached(model):
                adapter.build_head(model.num_features)
        except LoRAFormatError as e:
            return (
                f"⚠️ It does **not fit** the selected backbone {md_code(name)}: {md_text(user_text(e), 1000)}. "
                "Choose the backbone it was made for at the top of the page, then load it again."
            ), None
        mismatch = fit_mismatch(adapter, model)
        if mismatch:  # the shapes fit, but the weights are another model's (e.g. a ViT-B/16 LoRA on CLIP ViT-B/16)
            switch = (
                f" Switch the backbone at the top of the page to {md_code(adapter.backbone)}, then load it again;"
                if adapter.backbone
                else ""
            )
            return (
                f"⚠️ It fits the selected backbone {md_code(name)} in shape only: {md_text(mismatch, 400)}, so its "
                f"outputs would mean nothing here.{switch} **Invert** refuses it unless you tick **Invert anyway**."
            ), mismatch
        return f"✅ Fits the selected backbone {md_code(name)}: choose the classes and press **Invert**.", None

    def prior_checkbox(self, backbone: Optional[str]) -> dict:
        """The BN-prior checkbox for `backbone`: which prior it uses (label and info), ticked where that is the
        shipped glyph prior."""
        choice = self.settings.bn_prior_for(backbone.strip() if isinstance(backbone, str) else "")
        return gr.update(value=choice.default, label=choice.label, info=choice.info)

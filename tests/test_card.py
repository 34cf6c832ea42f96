"""Model cards: metadata the Hub accepts (checked by the fake Hub as the real one checks it), and push."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from recycle.card import write_model_card
from recycle.formats import read_adapter, save_adapter
from recycle.hub import HubError, push_folder
from tests.support.hubserver import card_metadata_errors
from tests.helpers import colour_task, train_tiny_lora

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@pytest.fixture()
def lora_dir(tiny_clip, tmp_path) -> Path:
    """A LoRA with a head, saved in PEFT layout, made on the local tiny CLIP."""
    images, labels = colour_task(2, 2)
    folder = tmp_path / "lora"
    save_adapter(train_tiny_lora(tiny_clip, images, labels, steps=2), folder)
    return folder


def _card(folder: Path, backbone: str, head: bool = True) -> ModelCard:
    adapter = read_adapter(folder)
    adapter.backbone = backbone
    if not head:
        adapter.head_weight = adapter.head_bias = adapter.class_names = None
    return ModelCard.load(write_model_card(folder, adapter, command="python -m recycle meta-train ..."))


def test_base_model_is_the_resolved_hub_repo_and_absent_for_local_backbones(lora_dir, tiny_clip_dir):
    assert _card(lora_dir, "clip-b16").data.base_model == "timm/vit_base_patch16_clip_224.openai"
    assert (
        _card(lora_dir, "vit_base_patch16_clip_224.openai").data.base_model == "timm/vit_base_patch16_clip_224.openai"
    )
    assert _card(lora_dir, "hf-hub:someorg/some-vit@v1").data.base_model == "someorg/some-vit"
    for local in (str(tiny_clip_dir), f"local-dir:{tiny_clip_dir}", "weights/mini-vit"):
        card = _card(lora_dir, local)
        assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    with_head = _card(lora_dir, "clip-b16")
    assert (with_head.data.pipeline_tag, with_head.data.library_name, with_head.data.license) == (
        "image-classification",
        "peft",
        "apache-2.0",
    )
    assert "lora-recycle" in with_head.data.tags
    assert _card(lora_dir, "clip-b16", head=False).data.pipeline_tag == "image-feature-extraction"


def test_push_succeeds_with_a_card_the_hub_accepts(lora_dir, tiny_clip_dir, local_hub):
    shutil.copytree(tiny_clip_dir, local_hub.root / "testorg" / "tiny-clip")
    _card(lora_dir, "hf-hub:testorg/tiny-clip")
    push_folder(lora_dir, "me/lora", token="test")
    pushed = ModelCard.load(local_hub.root / "me" / "lora" / "README.md")
    assert pushed.data.base_model == "testorg/tiny-clip"
    _card(lora_dir, str(tiny_clip_dir))  # a local backbone: no base_model at all
    push_folder(lora_dir, "me/lora", token="test")
    assert ModelCard.load(local_hub.root / "me" / "lora" / "README.md").data.base_model is None


@pytest.mark.parametrize(
    "typed", ["weights/mini-vit", "clip-b16", "vit_base_patch16_clip_224.openai", "hf-hub:testorg/tiny-clip"]
)
def test_yesterdays_card_with_the_backbone_as_typed_is_refused(lora_dir, local_hub, typed):
    """The card written before cards were built from ModelCardData: `base_model` was the backbone string."""
    shutil.copytree(lora_dir, local_hub.root / "timm" / "vit_base_patch16_clip_224.openai")  # exists on this Hub
    (local_hub.root / "testorg" / "tiny-clip").mkdir(parents=True)
    (lora_dir / "README.md").write_text(
        f"---\nlibrary_name: peft\ntags:\n- lora-recycle\n- few-shot\n- timm\n- lora\n"
        f"base_model: {typed}\n---\n\n# LoRA\n"
    )
    with pytest.raises(HubError, match=rf"(?s)refused the model card.*base_model.*{re.escape(typed)}") as info:
        push_folder(lora_dir, "me/lora", token="test")
    assert "README.md" in str(info.value)
    assert not (local_hub.root / "me" / "lora" / "adapter_model.safetensors").exists()
    # The same LoRA with today's card goes through, and names the repo the backbone really comes from.
    if typed != "weights/mini-vit":
        assert _card(lora_dir, typed).data.base_model in ("timm/vit_base_patch16_clip_224.openai", "testorg/tiny-clip")
        push_folder(lora_dir, "me/lora", token="test")


def test_a_base_model_missing_from_the_hub_is_refused(lora_dir, local_hub):
    _card(lora_dir, "clip-b16")  # timm/vit_base_patch16_clip_224.openai does not exist on this Hub
    with pytest.raises(HubError, match="base_model"):
        push_folder(lora_dir, "me/lora", token="test")


def test_hub_validation_rules():
    def exists(repo):
        return repo == "org/model"

    assert card_metadata_errors("---\nbase_model: org/model\nlicense: mit\n---\n# x\n", exists) == ([], [])
    assert card_metadata_errors("---\nbase_model: [org/model, org/missing]\n---\n", exists)[0] == [
        '"base_model" with value "org/missing" is not valid. Use a model id from https://hf.co/models.'
    ]
    assert "Invalid YAML" in card_metadata_errors("---\ntags: [unclosed\n---\n", exists)[0][0]
    assert card_metadata_errors("---\n- a\n- b\n---\n", exists)[0]
    assert card_metadata_errors("---\ntags: lora\nlicense: 3\n---\n", exists)[0] == [
        '"license" must be a string',
        '"tags" must be an array of strings',
    ]
    errors, warnings = card_metadata_errors("# no metadata\n", exists)
    assert errors == [] and warnings


@pytest.mark.parametrize("name", ["mini-meta-lora", "example-lora", "glyph-prior"])
def test_shipped_cards_pass_the_hubs_validation(name):
    card = (WEIGHTS / name / "README.md").read_text()
    assert card_metadata_errors(card, lambda repo: False) == ([], [])  # local backbone: no base_model
    assert ModelCard(card).data.pipeline_tag in ("image-classification", "image-feature-extraction")


def test_push_takes_the_token_from_hf_token_and_warns_about_one_on_the_command_line(
    lora_dir, tiny_clip_dir, local_hub, monkeypatch, caplog
):
    from recycle.cli import main

    _card(lora_dir, str(tiny_clip_dir))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(local_hub.root.parent / "no-login" / "token"))
    # a user error: the fake Hub wants a token to write
    assert main(["push", "--dir", str(lora_dir), "--repo", "me/lora"]) == 1
    monkeypatch.setenv("HF_TOKEN", "test")
    assert main(["push", "--dir", str(lora_dir), "--repo", "me/lora"]) == 0
    assert "--token" not in caplog.text
    assert main(["push", "--dir", str(lora_dir), "--repo", "me/lora2", "--token", "test"]) == 0
    assert "HF_TOKEN" in caplog.text and "shell history" in caplog.text


def test_push_uploads_regular_files_only_never_what_a_link_points_to(lora_dir, tiny_clip_dir, local_hub, tmp_path):
    _card(lora_dir, str(tiny_clip_dir))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "token.json").write_text('{"token": "hf_secret"}')
    (lora_dir / "leak.json").symlink_to(secret / "token.json")
    (lora_dir / "linked").symlink_to(secret, target_is_directory=True)
    (lora_dir / "nested").mkdir()
    (lora_dir / "nested" / "notes.md").write_text("kept")
    push_folder(lora_dir, "me/lora", token="test")
    repo = local_hub.root / "me" / "lora"
    pushed = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert pushed == ["README.md", "adapter_config.json", "adapter_model.safetensors", "nested/notes.md"]
    assert not any("hf_secret" in p.read_text(errors="ignore") for p in repo.rglob("*") if p.is_file())
    # a folder whose only weights are a link has nothing to push
    only_link = tmp_path / "only-link"
    only_link.mkdir()
    (only_link / "adapter_model.safetensors").symlink_to(lora_dir / "adapter_model.safetensors")
    with pytest.raises(HubError, match="symbolic links are never pushed"):
        push_folder(only_link, "me/lora2", token="test")

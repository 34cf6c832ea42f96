"""Hostile zoo manifests (zoo.json) and zoo folders: one validation, errors that name the file and the entry."""

from __future__ import annotations

import json
import re

import pytest

from recycle.cli import main
from recycle.formats import save_adapter
from recycle.zoo import load_zoo
from tests.helpers import colour_task, train_tiny_lora


@pytest.fixture()
def zoo(tiny_clip, tmp_path):
    """A zoo of two tiny LoRAs with heads, listed in zoo.json, and a LoRA folder next to it (outside the zoo)."""
    root = tmp_path / "zoo"
    for k in range(2):
        save_adapter(train_tiny_lora(tiny_clip, *colour_task(2, 2), steps=1, seed=k), root / f"lora_{k:03d}")
    save_adapter(train_tiny_lora(tiny_clip, *colour_task(2, 2), steps=1, seed=5), tmp_path / "other")
    (root / "zoo.json").write_text(
        json.dumps({"format": "recycle-zoo", "loras": [{"name": "lora_000"}, {"name": "lora_001"}]})
    )
    return root


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# zoo.json text -> the error it must give (every one names zoo.json)
MANIFESTS = {
    "empty list": ("[]", r"zoo\.json holds a JSON list; a zoo manifest is an object"),
    "null": ("null", r"zoo\.json holds a JSON null"),
    "loras as text": ('{"loras": "abc"}', r"zoo\.json: 'loras' must be a list of entries, got \"abc\""),
    "loras as an object": ('{"loras": {"name": "lora_000"}}', r"'loras' must be a list of entries"),
    "entry without a name": ('{"loras": [{"classes": []}]}', r"zoo\.json: entry 1 of 'loras' has no 'name'"),
    "numeric name": ('{"loras": [{"name": 7}]}', r"entry 1 of 'loras': its name must be text, got 7"),
    "entry as a string": ('{"loras": ["lora_000"]}', r"entry 1 of 'loras' must be an object"),
    "deep nesting": ('{"loras": ' + _nested(100_000) + "}", r"zoo\.json is nested too deeply"),
    "parent path": ('{"loras": [{"name": "../other"}]}', r"its name '\.\./other' is a path"),
    "absolute path": ('{"loras": [{"name": "/etc"}]}', r"its name '/etc' is a path"),
    "dot-dot": ('{"loras": [{"name": ".."}]}', r"its name '\.\.' is not a folder name"),
    "duplicate name": (
        '{"loras": [{"name": "lora_000"}, {"name": "lora_000"}]}',
        r"entries 1 and 2 of 'loras' are both named 'lora_000'",
    ),
    "missing folder": ('{"loras": [{"name": "lora_009"}]}', r"lists LoRA 'lora_009', but the zoo has no folder"),
    "config as text": ('{"config": "x", "loras": []}', r"zoo\.json: 'config' must be an object"),
    "not UTF-8": (b'{"loras": [{"name": "\xff"}]}', r"zoo\.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_hostile_zoo_manifests_are_refused_naming_the_file_and_entry(zoo, case):
    text, expected = MANIFESTS[case]
    (zoo / "zoo.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=expected) as info:
        load_zoo(zoo)
    assert "zoo.json" in str(info.value)


def test_a_link_out_of_the_zoo_is_refused(zoo):
    (zoo / "escape").symlink_to(zoo.parent / "other", target_is_directory=True)
    (zoo / "zoo.json").write_text(json.dumps({"loras": [{"name": "escape"}]}))
    with pytest.raises(ValueError, match=r"LoRA 'escape' resolves outside the zoo folder"):
        load_zoo(zoo)


def test_a_bad_lora_is_named(zoo):
    (zoo / "lora_001" / "adapter_model.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(ValueError, match=r"zoo '.*', LoRA 'lora_001': .*adapter_model\.safetensors"):
        load_zoo(zoo)


def test_the_cli_reports_hostile_zoos_in_one_line(zoo, tiny_clip_dir, tmp_path, capsys):
    (zoo / "zoo.json").write_text('{"loras": "abc"}')
    code = main(
        [
            "invert",
            "--backbone",
            str(tiny_clip_dir),
            "--zoo",
            str(zoo),
            "--out",
            str(tmp_path / "pool"),
            "--per-class",
            "1",
            "--steps",
            "1",
            "--bn-prior",
            "none",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert re.search(r"^error: .*zoo\.json: 'loras' must be a list", err, re.M), err


def test_names_that_collide_as_folder_names_are_refused_before_inverting(zoo, tiny_clip, tmp_path):
    import shutil

    from recycle.invert import InversionConfig
    from recycle.pool import PoolError
    from recycle.zoo import invert_zoo

    shutil.copytree(zoo / "lora_000", zoo / "a b")
    shutil.copytree(zoo / "lora_000", zoo / "a-b")
    (zoo / "zoo.json").write_text(json.dumps({"loras": [{"name": "a b"}, {"name": "a-b"}]}))
    with pytest.raises(PoolError, match=r"LoRAs 'a b' and 'a-b' would both be inverted into the pool run 'a-b-"):
        invert_zoo(tiny_clip, zoo, tmp_path / "pool", InversionConfig(steps=1, per_class=1))
    assert not (tmp_path / "pool").exists()


def test_duplicates_never_count_twice_in_the_average(zoo, tiny_clip_dir, tmp_path, capsys):
    (zoo / "zoo.json").write_text(json.dumps({"loras": [{"name": "lora_000"}, {"name": "lora_000"}]}))
    code = main(
        [
            "eval",
            "--backbone",
            str(tiny_clip_dir),
            "--zoo",
            str(zoo),
            "--data",
            str(tmp_path / "nowhere"),
            "--device",
            "cpu",
            "--episodes",
            "1",
        ]
    )
    assert code == 1 and "both named 'lora_000'" in capsys.readouterr().err


def test_older_manifests_with_nan_accuracies_still_load(zoo):
    (zoo / "zoo.json").write_text('{"loras": [{"name": "lora_000", "holdout_acc": NaN}, {"name": "lora_001"}]}')
    assert [name for name, _ in load_zoo(zoo)] == ["lora_000", "lora_001"]

"""Pools on the Hub as datasets (`recycle.pool_hub`), against the fake Hub: push (library and CLI), the imagefolder
layout `datasets` reads, browsing a pushed pool back, and hostile pool datasets refused as local ones are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from recycle.cli import main
from recycle.hub import HubError
from recycle.pool import Pool, PoolError, teacher_confidence
from recycle.pool.hub import HubPoolLimits, fetch_pool, hub_dataset_id
from recycle.pool.hub_publish import pool_dataset_files, push_pool
from tests.support.apptools import make_pool, tiny_lora

REPO = "org/pool"
COLUMNS = {
    "file_name",
    "masked_file_name",
    "class",
    "label",
    "source",
    "source_fingerprint",
    "run",
    "teacher_confidence",
    "teacher_confidence_kept",
    "kept",
}


@pytest.fixture(scope="module")
def pool_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    """Two runs of two LoRAs: the first masked at 75%, the second unmasked (2 classes x 3 images each)."""
    root = tmp_path_factory.mktemp("pools")
    loras = [tiny_lora(tiny_clip_dir, root / f"lora{i}", steps=3) for i in range(2)]
    return make_pool(root / "pool", tiny_clip_dir, loras)


def _dataset(hub, repo_id: str = REPO) -> Path:
    return hub.root / "datasets" / repo_id


def _pushed(hub, pool_dir: Path, repo_id: str = REPO) -> Path:
    push_pool(pool_dir, repo_id, token="test")
    return _dataset(hub, repo_id)


def test_push_writes_the_imagefolder_layout_with_per_image_metadata_and_a_card(local_hub, pool_dir):
    url = push_pool(pool_dir, REPO, token="test")
    assert url.endswith("/datasets/org/pool")
    repo = _dataset(local_hub)
    pool = Pool(pool_dir)
    runs = [d.name for d in pool.run_dirs]
    assert sorted(p.name for p in (repo / "data").iterdir()) == runs
    # the documented imagefolder rules: a metadata.jsonl per folder, `file_name`/`*_file_name` relative to it and
    # inside it, the same columns in every metadata file
    for r, (run_dir, manifest) in enumerate(zip(pool.run_dirs, pool.runs)):
        meta = repo / "data" / run_dir.name / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        assert len(rows) == len(manifest["items"]) == 6
        for row, item in zip(rows, manifest["items"]):
            assert set(row) == COLUMNS
            for key in ("file_name", "masked_file_name"):
                assert not Path(row[key]).is_absolute() and ".." not in Path(row[key]).parts
                assert (meta.parent / row[key]).is_file()
            assert (meta.parent / row["file_name"]).read_bytes() == (run_dir / item["image"]).read_bytes()
            assert row["class"] == item["class"] and row["label"] == item["label"] and row["run"] == run_dir.name
            assert row["source"] == f"org/lora-{r}" and row["source_fingerprint"] == manifest["source"]["fingerprint"]
            assert row["teacher_confidence"] == pytest.approx(
                teacher_confidence([item["logits"]], [item["label"]]).item(), abs=1e-6
            )
            if r == 0:  # masked at 75%: 4 of 16 patches kept
                assert row["masked_file_name"] == item["masked"] != row["file_name"] and row["kept"] == item["kept"]
                assert len(row["kept"]) == 4
            else:  # unmasked: its own masked version, every patch kept
                assert row["masked_file_name"] == row["file_name"] and row["kept"] == list(range(16))
                assert row["teacher_confidence_kept"] == row["teacher_confidence"]
        assert (repo / "data" / run_dir.name / "manifest.json").read_bytes() == (run_dir / "manifest.json").read_bytes()
    card = (repo / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"] == [{"config_name": "default", "data_dir": "data"}]
    assert meta["task_categories"] == ["image-classification"] and "lora-recycle" in meta["tags"]
    assert meta["lora_recycle"] == {
        "format": "recycle-pool",
        "version": 1,
        "runs": 2,
        "images": 12,
        "sources": len(pool.sources()),
    }
    assert f'load_dataset("{REPO}"' in card and all(f"### {name}" in card for name in runs)
    assert '"steps": 6' in card  # the settings of each run


def test_a_pushed_pool_is_browsed_back_as_the_same_pool(local_hub, pool_dir, tmp_path):
    _pushed(local_hub, pool_dir)
    root = fetch_pool(REPO, cache_dir=tmp_path / "cache")
    assert root.is_dir() and root.is_relative_to(tmp_path / "cache")
    local, remote = Pool(pool_dir), Pool(root)
    assert remote.sources() == local.sources() and remote.masked_available == local.masked_available
    assert [(c.name, len(c.items)) for c in remote.classes] == [(c.name, len(c.items)) for c in local.classes]
    ref = remote.classes[0].items[0]
    assert torch.equal(remote.load(ref, masked=True), local.load(ref, masked=True))
    assert not any(p.is_symlink() for p in root.rglob("*"))  # real files: the pool's inside-the-run rule holds
    assert fetch_pool(REPO, cache_dir=tmp_path / "cache") == root  # the same commit is not downloaded again


def test_push_of_one_run_adds_it_and_keeps_the_others(local_hub, pool_dir, tmp_path):
    runs = [d.name for d in Pool(pool_dir).run_dirs]
    push_pool(pool_dir, REPO, token="test", runs=[runs[0]])
    assert [p.name for p in (_dataset(local_hub) / "data").iterdir()] == [runs[0]]
    card = (_dataset(local_hub) / "README.md").read_text()
    assert f"### {runs[0]}" in card and runs[1] not in card  # the card lists the pushed runs only
    push_pool(pool_dir, REPO, token="test", runs=[runs[1]])
    assert sorted(p.name for p in (_dataset(local_hub) / "data").iterdir()) == runs
    with pytest.raises(PoolError, match="has no run 'nope'"):
        push_pool(pool_dir, REPO, token="test", runs=["nope"])


def test_hub_dataset_references():
    assert hub_dataset_id("datasets/org/pool") == "org/pool" == hub_dataset_id("hf://datasets/org/pool")
    assert hub_dataset_id("https://huggingface.co/datasets/org/pool/") == "org/pool"
    assert hub_dataset_id("org/pool") is None and hub_dataset_id("/data/pool") is None
    for bad in ("datasets/org", "datasets/../etc", "datasets/a/b/c"):
        with pytest.raises(HubError, match="not a Hub dataset"):
            hub_dataset_id(bad)


def _first_manifest(repo: Path) -> Path:
    return sorted((repo / "data").glob("*/manifest.json"))[0]


def _edit_manifest(repo: Path, edit) -> None:
    path = _first_manifest(repo)
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


HOSTILE = {
    "a file outside its run": (
        lambda repo: _edit_manifest(repo, lambda m: m["items"][0].update(image="../../../../etc/passwd")),
        {},
        "not a file inside the run",
    ),
    "an absolute path": (
        lambda repo: _edit_manifest(repo, lambda m: m["items"][0].update(image="/etc/passwd")),
        {},
        "not a file inside the run",
    ),
    "NaN in a manifest": (
        lambda repo: _first_manifest(repo).write_text(
            _first_manifest(repo).read_text().replace('"logits": [', '"logits": [NaN, ', 1)
        ),
        {},
        "unreadable manifest",
    ),
    "a missing image": (
        lambda repo: next((repo / "data").glob("*/images/000001.png")).unlink(),
        {},
        "listed in the manifest but missing",
    ),
    "a manifest too large": (lambda repo: None, {"max_manifest_bytes": 1000}, "more than the 1,000 accepted"),
    "too many images in a manifest": (lambda repo: None, {"max_items": 2}, "more than the 2 accepted"),
    "too many bytes": (lambda repo: None, {"max_bytes": 5000}, "more than the 5,000 accepted"),
    "too many files": (lambda repo: None, {"max_files": 10}, "more than the 10 accepted"),
    "a listing far too long": (lambda repo: None, {"max_files": 3}, "lists 23 files"),
    "no runs": (lambda repo: shutil.rmtree(repo / "data"), {}, "holds no pool runs"),
    "not a manifest": (lambda repo: _first_manifest(repo).write_text("[1, 2]"), {}, "not a surrogate-pool manifest"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_pool_datasets_are_refused_as_local_pools_are(local_hub, pool_dir, tmp_path, case):
    spoil, limits, message = HOSTILE[case]
    repo = _pushed(local_hub, pool_dir)
    spoil(repo)
    with pytest.raises(PoolError, match=message):
        Pool(
            fetch_pool(REPO, HubPoolLimits(**limits), cache_dir=tmp_path / "cache"),
            max_items=limits.get("max_items", 100_000),
        )
    if limits and case != "too many images in a manifest":  # refused from the listing: nothing was downloaded
        assert not any((tmp_path / "cache").rglob("*.png"))


def test_unknown_datasets_and_an_unreachable_hub_are_clear_errors(local_hub, tmp_path):
    with pytest.raises(HubError, match="'org/none' does not exist"):
        fetch_pool("org/none", cache_dir=tmp_path)
    local_hub.stop()
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub"):
        fetch_pool("org/none", cache_dir=tmp_path)


def test_unpublishable_pools_are_refused_before_anything_is_uploaded(local_hub, pool_dir, tmp_path):
    copy = shutil.copytree(pool_dir, tmp_path / "pool")
    image = next(copy.glob("*/images/000000.png"))
    image.write_bytes(image.read_bytes()[:-4] + b"oops")
    with pytest.raises(PoolError, match="checksum mismatch"):
        push_pool(copy, REPO, token="test")
    assert not _dataset(local_hub).exists()
    with pytest.raises(HubError, match="not a Hub id"):
        push_pool(pool_dir, "not an id", token="test")
    with pytest.raises(PoolError, match="does not exist"):
        pool_dataset_files(tmp_path / "missing", REPO)


def test_push_pool_command(local_hub, pool_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "test")
    assert main(["push-pool", "--pool", str(pool_dir), "--repo", REPO]) == 0
    assert capsys.readouterr().out.strip().endswith("/datasets/org/pool")
    assert (_dataset(local_hub) / "README.md").is_file()
    assert main(["push-pool", "--pool", str(tmp_path / "missing"), "--repo", REPO]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: pool folder") and "does not exist" in err and len(err.splitlines()) == 1
    assert main(["push-pool", "--pool", str(pool_dir), "--repo", "bad id"]) == 1
    assert "not a Hub id" in capsys.readouterr().err


def test_older_downloads_are_removed_and_only_inside_the_cache(local_hub, pool_dir, tmp_path):
    from recycle.pool.hub import remove_downloads

    runs = [d.name for d in Pool(pool_dir).run_dirs]
    push_pool(pool_dir, REPO, token="test", runs=[runs[0]])
    first = fetch_pool(REPO, cache_dir=tmp_path / "cache")
    push_pool(pool_dir, REPO, token="test", runs=[runs[1]])  # a new commit
    second = fetch_pool(REPO, cache_dir=tmp_path / "cache")
    assert first != second and len(Pool(second).runs) == 2
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cache" / "org--pool" / "link").symlink_to(outside, target_is_directory=True)
    assert remove_downloads(REPO, keep=second, cache_dir=tmp_path / "cache") == 1
    assert not first.exists() and second.is_dir() and outside.is_dir()
    assert remove_downloads(REPO, cache_dir=tmp_path / "cache") == 1 and not second.exists()
    assert remove_downloads("../..", cache_dir=tmp_path / "cache") == 0

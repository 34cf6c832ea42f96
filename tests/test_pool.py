import json
import math
import random

import pytest
import torch

from recycle.episodes import EpisodeSampler, EpisodeSpec
from recycle.formats import LoRAAdapter
from recycle.invert import InversionResult
from recycle.lora import LoRAConfig
from recycle.pool import Pool, PoolError, teacher_confidence, write_run


def _adapter(seed, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    state = {
        "blocks.0.attn.qkv.lora_A.all": torch.randn(2, 8, generator=g),
        "blocks.0.attn.qkv.lora_B.all": torch.randn(24, 2, generator=g),
    }
    return LoRAAdapter(
        LoRAConfig(targets=("qkv",), rank=2),
        state,
        "tiny",
        torch.randn(n_classes, 8, generator=g),
        torch.zeros(n_classes),
        [f"s{seed}-c{i}" for i in range(n_classes)],
    )


def _result(n_classes=3, per_class=4, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    n = n_classes * per_class
    images = (torch.rand(n, 3, 32, 32, generator=g) * 255).round() / 255
    images[0, :, :8, :8] = 0  # a black patch that is kept: masks must not be inferred from pixels
    kept = torch.stack([torch.randperm(16, generator=g)[:8].sort().values for _ in range(n)])
    kept[0, 0] = 0
    kept[0] = kept[0].sort().values
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    logits = torch.randn(n, n_classes, generator=g)
    if not masked:
        return InversionResult(images, labels, logits)
    from recycle.tokens import keep_mask, mask_images

    return InversionResult(images, labels, logits, kept, mask_images(images, keep_mask(kept, (4, 4))), logits + 0.1)


@pytest.fixture()
def pool_dir(tmp_path):
    root = tmp_path / "pool"
    write_run(root, _result(seed=0), _adapter(0), "org/lora-a", {"steps": 10}, (4, 4))
    write_run(root, _result(seed=1), _adapter(1), "org/lora-b", {"steps": 10}, (4, 4))
    return root


def test_round_trip_and_listing(pool_dir):
    pool = Pool(pool_dir)
    sources = pool.sources()
    assert len(sources) == 2 and {s["name"] for s in sources.values()} == {"org/lora-a", "org/lora-b"}
    assert len(pool.classes) == 6 and all(len(c.items) == 4 for c in pool.classes)
    original = _result(seed=0)
    ref = pool.classes[0].items[0]
    assert torch.allclose(pool.load(ref), original.images[0], atol=1 / 255 + 1e-6)
    assert torch.equal(pool.kept(ref), original.kept[0]) and 0 in pool.kept(ref).tolist()
    masked = pool.load(ref, masked=True)
    assert masked[:, :8, :8].abs().sum() == 0  # kept but black, and still listed as kept
    assert pool.masked_available


def test_teacher_confidence_is_the_softmax_at_each_label(pool_dir):
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # softmax: (1/4, 3/4) and (4/5, 1/5)
    assert torch.allclose(teacher_confidence(logits, torch.tensor([1, 1])), torch.tensor([0.75, 0.2]))
    assert torch.allclose(teacher_confidence(logits.double(), [0, 0]), torch.tensor([0.25, 0.8]))
    pool = Pool(pool_dir)  # the manifest's logits are lists: the same numbers as the tensors written
    ref = pool.classes[0].items[0]
    conf = teacher_confidence([pool.item(ref)["logits"]], [pool.classes[0].label])
    written = (
        _result(seed=0).logits[ref.index]
        if pool.sources()[pool.classes[0].source]["name"] == "org/lora-a"
        else _result(seed=1).logits[ref.index]
    )
    assert conf.item() == pytest.approx(written.softmax(-1)[pool.classes[0].label].item(), abs=1e-5)


def test_pool_grows_and_same_lora_runs_share_a_source(pool_dir):
    write_run(pool_dir, _result(seed=2), _adapter(0), "org/lora-a", {"steps": 10, "seed": 2}, (4, 4))
    pool = Pool(pool_dir)
    assert len(pool.runs) == 3 and len(pool.sources()) == 2
    assert sorted(len(c.items) for c in pool.classes) == [4, 4, 4, 8, 8, 8]


def test_single_and_cross_episodes(pool_dir):
    pool = Pool(pool_dir)
    rng = random.Random(0)
    spec = EpisodeSpec(way=3, shot=1, query=2)
    ep = pool.sample_episode(spec, "single", masked=True, rng=rng)
    assert ep.support.shape == (3, 3, 32, 32) and ep.query.shape == (6, 3, 32, 32)
    assert ep.query_labels.tolist() == [0, 0, 1, 1, 2, 2] and len({c.source for c in ep.classes}) == 1
    assert ep.teacher_logits.shape == (6, 3) and len(ep.query_kept) == 6
    cross = pool.sample_episode(spec, "cross", rng=rng)
    assert len({c.source for c in cross.classes}) >= 2 and cross.teacher_logits is None
    with pytest.raises(ValueError, match="too few classes"):
        pool.sample_episode(EpisodeSpec(way=4, shot=1, query=2), "single")


def test_episode_sampler_cross_uses_distinct_groups():
    sampler = EpisodeSampler([[i] * 5 for i in range(10)], groups=[i // 2 for i in range(10)])
    rng = random.Random(1)
    for _ in range(20):
        ep = sampler.sample(EpisodeSpec(way=5, shot=1, query=1), "cross", rng)
        assert len({sampler.groups[c] for c in ep.classes}) == 5
    with pytest.raises(ValueError, match="way"):
        EpisodeSpec(way=1)


def test_half_written_and_corrupt_pools_fail_clearly(pool_dir, tmp_path):
    (pool_dir / ".tmp-run-in-progress").mkdir()  # an interrupted write is ignored
    assert len(Pool(pool_dir).runs) == 2
    with pytest.raises(PoolError, match="does not exist"):
        Pool(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PoolError, match="no runs"):
        Pool(empty)

    run = sorted(p for p in pool_dir.iterdir() if not p.name.startswith("."))[0]
    image = run / "images" / "000001.png"
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF
    image.write_bytes(bytes(data))
    pool = Pool(pool_dir)
    bad = next(c for c in pool.classes if c.items[0].run == 0)
    with pytest.raises(PoolError, match="checksum mismatch"):
        pool.load(bad.items[1])

    (run / "masked" / "000003.png").unlink()
    with pytest.raises(PoolError, match="missing"):
        Pool(pool_dir)
    manifest = run / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(PoolError, match="unreadable manifest"):
        Pool(pool_dir)
    manifest.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PoolError, match="not a surrogate-pool"):
        Pool(pool_dir)
    manifest.unlink()
    with pytest.raises(PoolError, match="incomplete"):
        Pool(pool_dir)


def test_unmasked_pool_refuses_masked_loading(tmp_path):
    write_run(tmp_path, _result(masked=False), _adapter(0), "x", {}, (4, 4))
    pool = Pool(tmp_path)
    assert not pool.masked_available
    with pytest.raises(PoolError, match="no masked images"):
        pool.load(pool.classes[0].items[0], masked=True)


# ------------------------------------------------------------------------------------------------- hostile input
def test_non_finite_values_are_never_written(tmp_path):
    result = _result()
    result.logits[0, 0] = float("nan")
    with pytest.raises(PoolError, match="logits contain NaN or Inf"):
        write_run(tmp_path / "pool", result, _adapter(0), "org/a", {}, (4, 4))
    with pytest.raises(PoolError, match="non-finite number"):
        write_run(tmp_path / "pool", _result(), _adapter(0), "org/a", {"lr": float("inf")}, (4, 4))
    assert not any((tmp_path / "pool").iterdir())  # nothing half-written is left behind


def _edit_manifest(pool_dir, edit):
    run = next(p for p in sorted(pool_dir.iterdir()))
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(edit(text, json.loads(text), run))
    return run


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m, r: t.replace(str(m["items"][0]["logits"][0]), "NaN", 1), r"not valid JSON: NaN"),
        (lambda t, m, r: t.replace(str(m["items"][0]["logits"][0]), "1e999", 1), r"1e999 is out of range"),
        (lambda t, m, r: "[" * 100_000 + "]" * 100_000, r"nested too deeply"),
        (
            lambda t, m, r: json.dumps({**m, "items": [{**m["items"][0], "logits": ["x"]}]}),
            r"malformed.*invalid logits",
        ),
        (lambda t, m, r: json.dumps({**m, "items": [{**m["items"][0], "label": 99}]}), r"malformed.*invalid label 99"),
        (
            lambda t, m, r: json.dumps({**m, "items": [{**m["items"][0], "kept": [0, 10**6]}]}),
            r"invalid kept \(patch indices must be distinct and below the 4x4 grid's 16\)",
        ),
        (
            lambda t, m, r: json.dumps({**m, "items": [{**m["items"][0], "kept": [3, 3]}]}),
            r"invalid kept",
        ),
        (
            lambda t, m, r: json.dumps({**m, "items": [{**m["items"][0], "logits": [1e39] * 3}]}),
            r"invalid logits \(a teacher logit beyond float32's range\)",
        ),
        (lambda t, m, r: json.dumps({**m, "image_size": [10**6, 10**6]}), r"invalid image_size"),
        (
            lambda t, m, r: json.dumps({**m, "source": {**m["source"], "class_names": [1, 2, 3]}}),
            r"malformed.*invalid class_names",
        ),
    ],
)
def test_manifests_are_read_as_strict_json(pool_dir, edit, message):
    _edit_manifest(pool_dir, edit)
    with pytest.raises(PoolError, match=message):
        Pool(pool_dir)


@pytest.mark.parametrize("target", ["absolute", "dotdot", "symlink"])
def test_a_pool_never_reads_files_outside_its_runs(pool_dir, tmp_path, target):
    """A manifest naming a file elsewhere on disk (with a matching checksum) is refused, not followed."""
    outside = tmp_path / "secret.png"
    run = sorted(pool_dir.iterdir())[0]
    outside.write_bytes((run / "images" / "000000.png").read_bytes())

    def edit(text, m, r):
        if target == "symlink":
            (r / "images" / "000000.png").unlink()
            (r / "images" / "000000.png").symlink_to(outside)
            return text
        name = str(outside) if target == "absolute" else "../../secret.png"
        m["items"][0]["image"] = name
        return json.dumps(m)

    _edit_manifest(pool_dir, edit)
    with pytest.raises(PoolError, match=r"(not a file inside the run|resolves outside the run folder)"):
        Pool(pool_dir)


def test_pool_folders_that_cannot_be_written_give_clear_errors(tmp_path, monkeypatch):
    import errno
    import os

    import pathlib

    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(PoolError, match=r"pool folder '.*dangling' is a symbolic link to '.*gone', which does not"):
        write_run(tmp_path / "dangling", _result(), _adapter(0), "org/a", {}, (4, 4))
    if os.path.isdir("/proc/self"):
        with pytest.raises(PoolError, match=r"cannot write the run into the pool folder '/proc/self/pool'"):
            write_run("/proc/self/pool", _result(), _adapter(0), "org/a", {}, (4, 4))

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(PoolError, match=r"cannot write the run into the pool folder .*No space left.*disk is full"):
        write_run(tmp_path / "pool", _result(), _adapter(0), "org/a", {}, (4, 4))
    assert list((tmp_path / "pool").iterdir()) == []  # nothing half-written is left


def test_unreadable_pool_folders_give_clear_errors(tmp_path):
    with pytest.raises(PoolError, match=r"pool folder '.*' (does not exist|cannot be read)"):
        Pool(tmp_path / "missing")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(PoolError, match=r"pool folder '.*dangling' does not exist"):
        Pool(tmp_path / "dangling")


def test_a_pool_index_reads_each_manifest_once_and_follows_changes(pool_dir):
    import json as _json

    from recycle.pool import PoolIndex

    index = PoolIndex(pool_dir)
    first = index.pool()
    assert len(first.runs) == 2 and index.reads == 2
    assert index.pool() is first and index.reads == 2  # nothing changed: nothing read, the same pool
    write_run(pool_dir, _result(seed=2), _adapter(2), "org/lora-c", {"steps": 10}, (4, 4))
    grown = index.pool()
    assert len(grown.runs) == 3 and index.reads == 3  # only the new run is read
    run = sorted(p for p in pool_dir.iterdir() if p.is_dir())[0]
    manifest = _json.loads((run / "manifest.json").read_text())
    manifest["settings"]["steps"] = 11
    (run / "manifest.json").write_text(_json.dumps(manifest))
    changed = index.pool()
    assert index.reads == 4 and any(r["settings"]["steps"] == 11 for r in changed.runs)
    import shutil

    shutil.rmtree(run)
    assert len(index.pool().runs) == 2 and index.reads == 4  # a removed run disappears without reading
    assert index.pool().masked_available


def test_manifest_bounds(pool_dir):
    run = sorted(p for p in pool_dir.iterdir() if p.is_dir())[0]
    size = (run / "manifest.json").stat().st_size
    with pytest.raises(PoolError, match=rf"the manifest is {size:,} bytes, more than the 100 accepted"):
        Pool(pool_dir, max_manifest_bytes=100)
    with pytest.raises(PoolError, match=r"the manifest lists 12 images, more than the 5 accepted in one run"):
        Pool(pool_dir, max_items=5)


def test_a_pool_index_reads_at_most_max_runs(pool_dir):
    from recycle.pool import PoolIndex

    index = PoolIndex(pool_dir, max_runs=1)
    assert len(index.pool().runs) == 1 and index.total_runs == 2 and index.reads == 1

import dataclasses
import json
import random
from dataclasses import replace

import pytest
import torch

from recycle.backbone import load_backbone
from recycle.episodes import EpisodeSpec
from recycle.invert import InversionConfig, invert
from recycle.lora import LoRAConfig, lora_layers, remove_lora
from recycle.episodes import PoolEpisodes
from recycle.meta import MetaConfig, cyclic_lr, episode_loss, flip_kept, meta_train
from recycle.pool import Pool, write_run
from recycle.tokens import keep_mask
from tests.helpers import colour_task, train_tiny_lora


ZOO: list = []  # the pool's two LoRAs, made by `pool_dir`


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory, tiny_clip_dir):
    """Two tiny LoRAs (3 colours each), inverted with pruning into one pool."""
    backbone = load_backbone(str(tiny_clip_dir), device="cpu")
    root = tmp_path_factory.mktemp("pool")
    images, labels = colour_task(n_classes=6, per_class=4)
    ZOO.clear()
    for k, classes in enumerate([(0, 1, 2), (3, 4, 5)]):
        sel = [i for i, y in enumerate(labels) if y in classes]
        adapter = train_tiny_lora(backbone, [images[i] for i in sel], [classes.index(labels[i]) for i in sel], seed=k)
        result = invert(backbone, adapter, InversionConfig(per_class=5, steps=30, lr=0.1, pruning={1: 0.5}, seed=k))
        write_run(root, result, adapter, f"zoo/lora_{k}", {"steps": 30}, (4, 4))
        ZOO.append(adapter)
    return root


def _fixed_loss(backbone, source, adapter_state=None, n=6):
    rng = random.Random(123)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return (
            sum(
                episode_loss(backbone, source.next(k, rng), flip=False, generator=gen)[0].item()
                for k in ["single", "cross"] * (n // 2)
            )
            / n
        )


def test_cyclic_schedule():
    assert cyclic_lr(0) == pytest.approx(1e-5)
    assert cyclic_lr(25) == pytest.approx(1e-3)
    assert cyclic_lr(99) < 2e-5 and cyclic_lr(100) == pytest.approx(1e-5)
    assert cyclic_lr(62) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=0.05)
    assert cyclic_lr(137) == cyclic_lr(37)


def test_flip_kept_matches_flipping_the_mask():
    kept = torch.tensor([[0, 5, 6, 11, 15]])
    mask = keep_mask(kept, (4, 4))[0]
    flipped = mask.flip(1).flatten().nonzero().flatten()
    assert torch.equal(flip_kept(kept[0], (4, 4)), flipped)


@pytest.mark.parametrize("masked", [False, True])
def test_meta_training_lowers_the_loss(pool_dir, tiny_clip, tmp_path, masked):
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked)
    before = _fixed_loss(tiny_clip, source)
    config = MetaConfig(
        steps=40, way=3, shot=1, query=2, masked=masked, lr=1e-2, warmup=2, cycle=20, checkpoint_every=10
    )
    result = meta_train(tiny_clip, source, config, tmp_path / "run")
    assert not list(lora_layers(tiny_clip.model))  # the backbone is left clean
    result.adapter.inject(tiny_clip.model)
    after = _fixed_loss(tiny_clip, source)
    remove_lora(tiny_clip.model)
    assert after < before, (before, after)
    assert len(result.losses) == 40
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and {r["kind"] for r in log} == {"single", "cross"}
    assert (tmp_path / "run" / "meta-lora" / "adapter_model.safetensors").is_file()


def test_masked_episodes_feed_kept_tokens(pool_dir, tiny_clip, monkeypatch):
    import recycle.meta as meta

    calls = []
    real = meta.embed_kept
    monkeypatch.setattr(meta, "embed_kept", lambda b, x, kept: calls.append([len(k) for k in kept]) or real(b, x, kept))
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=True)
    episode_loss(tiny_clip, source.next("single", random.Random(0)))
    assert calls == [[8] * 9]  # 3 support + 6 queries, 8 of 16 patches each


def test_resume_equals_uninterrupted(pool_dir, tiny_clip, tmp_path):
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=True)
    config = MetaConfig(
        steps=12, way=3, shot=1, query=2, masked=True, lr=1e-2, checkpoint_every=5, lora=LoRAConfig(dropout=0.1)
    )
    full = meta_train(tiny_clip, source, config, tmp_path / "full")

    def crash(record):
        if record["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        meta_train(tiny_clip, source, config, tmp_path / "resumed", progress=crash)
    assert not list(lora_layers(tiny_clip.model))
    resumed = meta_train(tiny_clip, source, config, tmp_path / "resumed", resume=True)
    for key, value in full.adapter.state.items():
        assert torch.equal(resumed.adapter.state[key], value), key
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]


def test_a_kill_during_checkpointing_keeps_the_last_good_one(pool_dir, tiny_clip, tmp_path, monkeypatch):
    import os

    import recycle.io as rio

    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    config = MetaConfig(steps=10, way=3, shot=1, query=2, checkpoint_every=4)
    real_replace, writes = os.replace, []

    def dying_replace(src, dst):
        writes.append(dst)
        if str(dst).endswith("checkpoint.safetensors") and len([w for w in writes if "checkpoint" in str(w)]) == 2:
            raise KeyboardInterrupt  # killed after writing the temp file, before the rename
        return real_replace(src, dst)

    monkeypatch.setattr(rio.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        meta_train(tiny_clip, source, config, tmp_path / "run")
    monkeypatch.setattr(rio.os, "replace", real_replace)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]  # no temp file left
    resumed = meta_train(tiny_clip, source, config, tmp_path / "run", resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11)) and resumed.steps_done == 10


def test_validation_selects_the_best_on_a_real_split(pool_dir, tiny_clip, tmp_path):
    seen = []

    def validate(adapter):
        score = [0.1, 0.2, 0.9, 0.5][len(seen)]  # steps 0 (the bare backbone), 3, 6, 9
        seen.append({k: v.clone() for k, v in adapter.state.items()})
        return score

    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    config = MetaConfig(steps=9, way=3, shot=1, query=2, val_every=3, lr=1e-2)
    result = meta_train(tiny_clip, source, config, tmp_path / "run", validate=validate)
    assert result.best_step == 6 and result.best_val == 0.9 and result.baseline_val == 0.1
    for key, value in seen[2].items():
        assert torch.equal(result.adapter.state[key], value)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0] == {"step": 0, "val_acc": 0.1}


def test_selection_keeps_the_bare_backbone_when_no_step_beats_it(pool_dir, tiny_clip, tmp_path):
    scores = iter([0.8, 0.5, 0.6, 0.7])  # step 0 validates best
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    config = MetaConfig(steps=9, way=3, shot=1, query=2, val_every=3, lr=1e-2)
    result = meta_train(tiny_clip, source, config, tmp_path / "run", validate=lambda adapter: next(scores))
    assert result.best_step == 0 and result.best_val == 0.8
    assert result.adapter.info["best_step"] == 0
    # The exported meta-LoRA is the identity: every B (up-projection) is zero, so outputs equal the bare backbone.
    ups = {k: v for k, v in result.adapter.state.items() if "lora_B" in k}
    assert ups and all(not v.any() for v in ups.values())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        bare = tiny_clip.embed(x)
        with result.adapter.attached(tiny_clip):
            assert torch.allclose(tiny_clip.embed(x), bare, atol=1e-6)


def test_init_starts_from_the_given_lora_and_selection_can_keep_it(pool_dir, tiny_clip, tmp_path):
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    config = MetaConfig(steps=4, way=3, shot=1, query=2, val_every=2, lr=1e-2, lora=LoRAConfig(rank=8))
    start = meta_train(tiny_clip, source, replace(config, steps=3), tmp_path / "start").adapter  # non-zero A and B
    seen = []

    def validate(adapter):
        seen.append({k: v.clone() for k, v in adapter.state.items()})
        return [0.9, 0.5, 0.6][len(seen) - 1]  # step 0 (the start) validates best

    result = meta_train(tiny_clip, source, config, tmp_path / "run", validate=validate, init=start)
    for key, value in start.state.items():
        assert torch.equal(seen[0][key], value)  # step 0 scored the starting LoRA, not the identity
        assert torch.equal(result.adapter.state[key], value)  # and selection kept it
    assert any(not torch.equal(seen[-1][k], v) for k, v in start.state.items())  # the steps did train it
    assert result.best_step == 0 and result.adapter.info["init"] == dict(start.info)
    with pytest.raises(ValueError, match="differs from config.lora"):
        meta_train(tiny_clip, source, replace(config, lora=LoRAConfig(rank=4)), tmp_path / "bad", init=start)


def test_teacher_temperature_sharpens_the_kl_target(pool_dir, tiny_clip):
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    episode = source.next("single", random.Random(0))
    assert episode.teacher_logits is not None
    scaled = dataclasses.replace(episode, teacher_logits=episode.teacher_logits * 4)
    with torch.no_grad():
        at_quarter = episode_loss(tiny_clip, episode, flip=False, teacher_temperature=0.25)[0]
        times_four = episode_loss(tiny_clip, scaled, flip=False)[0]
        plain = episode_loss(tiny_clip, episode, flip=False)[0]
    assert torch.allclose(at_quarter, times_four) and not torch.allclose(at_quarter, plain)
    with pytest.raises(ValueError, match="teacher_temperature"):
        MetaConfig(teacher_temperature=0)


def test_bad_settings():
    with pytest.raises(ValueError, match="cross_fraction"):
        MetaConfig(cross_fraction=1.5)
    with pytest.raises(ValueError, match="way"):
        MetaConfig(way=1)


# ------------------------------------------------------------------------------------------------- hostile input
def _killed(pool_dir, tiny_clip, out, at_step, **settings):
    """Start a run in `out` and kill it when step `at_step` is done; returns its episode source and config."""
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    config = MetaConfig(way=3, shot=1, query=2, **settings)

    def crash(record):
        if record["step"] == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        meta_train(tiny_clip, source, config, out, progress=crash)
    return source, config


def test_a_resume_with_other_settings_is_refused(pool_dir, tiny_clip, tmp_path):
    source, config = _killed(pool_dir, tiny_clip, tmp_path / "run", 3, steps=4, checkpoint_every=2)
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    for change in ({"seed": 1}, {"lr": 0.01}, {"way": 2}, {"seed": 2, "masked": True}):
        with pytest.raises(ValueError, match="cannot resume .*run was started with other settings") as err:
            meta_train(tiny_clip, source, replace(config, **change), tmp_path / "run", resume=True)
        for key, value in change.items():
            assert f"{key}: {getattr(config, key)!r} -> {value!r}" in str(err.value)
        assert not list(lora_layers(tiny_clip.model))
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before  # nothing was lost
    with pytest.raises(ValueError, match="with steps=1: its checkpoint is at step 2"):
        meta_train(tiny_clip, source, replace(config, steps=1), tmp_path / "run", resume=True)
    resumed = meta_train(tiny_clip, source, replace(config, checkpoint_every=1), tmp_path / "run", resume=True)
    assert resumed.adapter.info["meta_training"]["seed"] == 0 and resumed.steps_done == 4
    assert "resumed" not in resumed.adapter.info
    # a longer run continues the same schedule; the exported LoRA records that it was extended, and when
    longer = meta_train(tiny_clip, source, replace(config, steps=6), tmp_path / "run", resume=True)
    assert longer.adapter.info["resumed"] == [{"at_step": 4, "steps": [4, 6]}]
    assert longer.adapter.info["meta_training"]["steps"] == 6


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_log_lines(pool_dir, tiny_clip, tmp_path):
    source, config = _killed(pool_dir, tiny_clip, tmp_path / "run", 2, steps=5, checkpoint_every=4)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    meta_train(tiny_clip, source, config, tmp_path / "run", resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]


def test_resume_without_a_checkpoint_says_so(pool_dir, tiny_clip, tmp_path, caplog):
    source = PoolEpisodes(Pool(pool_dir), EpisodeSpec(3, 1, 2), masked=False)
    config = MetaConfig(steps=2, way=3, shot=1, query=2, checkpoint_every=4)
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "log.jsonl").write_text('{"step": 1}\n')  # killed before its first checkpoint
    with caplog.at_level("WARNING"):
        assert meta_train(tiny_clip, source, config, tmp_path / "killed", resume=True).steps_done == 2
    assert (
        "holds no checkpoint.safetensors (the run stopped before its first checkpoint), so training starts from "
        "step 0" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        meta_train(tiny_clip, source, config, tmp_path / "new", resume=True)
    assert "(no run was started there), so training starts from step 0" in caplog.text


def test_the_cli_refuses_to_resume_a_folder_without_a_run(tmp_path, capsys, monkeypatch):
    import recycle.backbone
    from recycle.cli import main

    monkeypatch.setattr(recycle.backbone, "load_backbone", lambda *a, **k: pytest.fail("work started"))
    code = main(
        ["meta-train", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "typo"), "--steps", "1", "--resume"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "--resume: nothing to resume in" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 1e300),
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("teacher_temperature", float("inf")),
        ("teacher_temperature", 1e308),
        ("cross_fraction", float("nan")),
    ],
)
def test_float_settings_must_be_finite_and_in_range(field, value):
    with pytest.raises(ValueError, match=rf"invalid meta-training setting {field}=.*expected"):
        MetaConfig(**{field: value})
    with pytest.raises(ValueError, match=r"invalid inversion setting (lr|bn_weight)=.*expected"):
        InversionConfig(**({"lr": value} if field == "lr" else {"bn_weight": value}))


def test_pool_teachers_score_views_as_the_stored_logits_score_the_surrogates(pool_dir, tiny_clip, tmp_path):
    """On a surrogate itself the teacher gives the logits the pool stored; on a view it gives new ones; meta-training
    with teacher_on_views needs the teachers, and runs with them."""
    from recycle.episodes import PoolTeachers
    from recycle.views import ViewConfig, random_views

    teachers = PoolTeachers(tiny_clip, ZOO)
    pool = Pool(pool_dir)
    assert teachers.covers(pool) == [] and PoolTeachers(tiny_clip, ZOO[:1]).covers(pool) == ["zoo/lora_1"]
    episode = pool.sample_episode(EpisodeSpec(3, 1, 2), "single", rng=random.Random(0))
    stored = episode.teacher_logits
    assert (teachers.logits(episode, episode.query) - stored).abs().max() < 0.02  # the PNG's 8-bit rounding only
    views = random_views(episode.query, ViewConfig(stroke=1.0, recolour=1.0), torch.Generator().manual_seed(0))
    assert (teachers.logits(episode, views) - stored).abs().max() > 0.2
    cross = pool.sample_episode(EpisodeSpec(3, 1, 2), "cross", rng=random.Random(0))
    with pytest.raises(ValueError, match="single-LoRA episodes"):
        teachers.logits(cross, cross.query)
    config = MetaConfig(steps=2, way=3, query=2, views={"stroke": 0.5}, teacher_on_views=True, checkpoint_every=2)
    source = PoolEpisodes(pool, config.spec, False)
    with pytest.raises(ValueError, match="needs the pool's teachers"):
        meta_train(tiny_clip, source, config, tmp_path / "a")
    assert meta_train(tiny_clip, source, config, tmp_path / "b", teachers=teachers).steps_done == 2
    with pytest.raises(ValueError, match="teacher_on_views"):
        MetaConfig(teacher_on_views=True)  # without views

"""The offline reproduction: a toy-size smoke run of the whole pipeline, and a re-check of the shipped weights."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

glyphs = pytest.importorskip("reproduce.glyphs")
if glyphs.missing_fonts():
    pytest.skip(
        f"font packages {glyphs.missing_fonts()} are not installed (see reproduce/debian-packages.txt)",
        allow_module_level=True,
    )

from recycle.adapter import average_loras  # noqa: E402
from recycle.backbone import load_backbone  # noqa: E402
from recycle.checkpoint import checkpoint_lora  # noqa: E402
from recycle.evaluate import EvalConfig, evaluate  # noqa: E402
from recycle.formats import read_adapter  # noqa: E402
from recycle.invert import load_bn_prior  # noqa: E402
from recycle.zoo import load_zoo  # noqa: E402
from reproduce.diagnose import report  # noqa: E402
from reproduce.pipeline import ReproConfig, run  # noqa: E402
from reproduce.report import method_name, targets  # noqa: E402
from reproduce.ship import ship, shipped_run  # noqa: E402
from tests.support.toy import require_toy_run  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def splits_available_kana(work: Path) -> int:
    return json.loads((work / "data" / "splits.json").read_text())["available"]["kana"]


def test_toy_pipeline_runs_every_stage_and_resumes():
    work, results = require_toy_run()  # the session's toy run (tests.support.toy), every stage made afresh
    cfg = ReproConfig.toy()
    stages = [
        "data",
        "prior",
        "pretrain",
        "zoo",
        "meta-oracle",
        "structure",
        "invert",
        "surrogates",
        "temperature",
        "meta-recycle",
        "meta-recycle-25",
        "meta-recycle-50",
        "meta-recycle-75",
        "meta-recycle-75-bf16",
        "meta-recycle-from-average",
        "eval",
        "bf16-check",
    ]
    assert list(results["timings_seconds"]) == stages
    from reproduce.pipeline import STAGES

    assert list(STAGES) == stages  # --until names exactly these
    with pytest.raises(ValueError, match="until='invrt': not a stage"):
        run(work, cfg, until="invrt")
    ev = results["summaries"]["eval"]
    assert set(ev) - {"seconds"} == {
        "test-1shot",
        "test-5shot",
        "cross-1shot",
        "cross-5shot",
        "test-plain-1shot",
        "test-plain-5shot",
    }
    structure = results["summaries"]["structure"]
    assert set(structure["results"]) == {"NN", "LoRAs-average + NN", "Oracle (real zoo images)"}
    assert structure["checks"]["nn_at_least_45"] == (structure["results"]["NN"]["mean"] >= 45)
    pretrain = results["summaries"]["pretrain"]  # the contrastive foundation, on Han and kana
    assert pretrain["objective"] == "contrast" and 0 <= pretrain["positive_match"] <= 1
    assert pretrain["classes"] == cfg.data.pretrain + splits_available_kana(work)
    assert list(ev["test-1shot"]["results"]) == [
        "NN",
        "LoRAs-average + NN",
        "LoRA Recycle",
        "LoRA Recycle-25",
        "LoRA Recycle-50",
        "LoRA Recycle-75",
        "LoRA Recycle-75 (bf16)",
        "LoRA Recycle, from the LoRAs-average",
        "Oracle (real zoo images)",
    ]
    splits = json.loads((work / "data" / "splits.json").read_text())
    assert len(splits["fonts"]["han"]) == 8 and splits["available"]["han"] > 5000
    names = {s: {p.name for p in (work / "data" / s).iterdir()} for s in ("pretrain", "zoo", "val", "test")}
    assert {p.name for p in (work / "data" / "test-plain").iterdir()} == names["test"]
    for a in names:
        for b in names:
            assert a == b or not names[a] & names[b], (a, b)  # disjoint class splits
    assert (work / "results.md").read_text().startswith("| method |")
    assert (work / "results.png").stat().st_size > 10_000
    difficulty = results["summaries"]["surrogates"]["nn_accuracy"]
    assert {k: v["episodes"] for k, v in difficulty.items()} == {"surrogate": 3, "real": 3}
    table = (work / "results.md").read_text()
    assert "How hard the surrogate tasks are" in table and "Ceiling check" in table
    assert "## Targets" in table and "| Pipeline ≤ 150 minutes |" in table and "No damage" in table
    chosen = results["summaries"]["temperature"]["chosen"]
    assert chosen in cfg.temperatures and f"Teacher temperature chosen on validation: {chosen:g}" in table
    assert results["summaries"]["meta-recycle"]["teacher_temperature"] == chosen
    assert results["summaries"]["meta-oracle"]["val_curve"][0][0] == 0  # step 0: the bare backbone
    # The variant beyond the paper starts from the zoo's average, a LoRA of rank 4 x zoo size, and trains all of it.
    from_average = read_adapter(work / "meta-recycle-from-average" / "meta-lora")
    assert from_average.config.rank == cfg.zoo.lora.rank * cfg.zoo.num_loras
    assert from_average.info["init"] == {"averaged": cfg.zoo.num_loras}
    step, trained = checkpoint_lora(work / "meta-recycle-from-average")
    average = average_loras([a for _, a in load_zoo(work / "zoo")])
    assert step == cfg.meta.steps and set(trained) == set(average.state)
    assert any(not torch.equal(trained[k], average.state[k]) for k in trained)
    check = results["summaries"]["bf16-check"]  # the final meta-LoRAs, trained: not the identity
    assert check["step"] == cfg.meta.steps and "bf16 against fp32 meta-training" in table
    gap = abs(check["bf16"]["mean"] - check["fp32"]["mean"])
    assert check["within_fp32_ci"] == (gap <= check["fp32"]["ci95"])
    with Image.open(work / "surrogates.png") as fig:  # 2 runs x 5 classes, real | surrogate | masked
        assert fig.height > 10 * 32 and fig.width > 3 * 4 * 32

    again = run(work, cfg)  # every stage is skipped: same numbers
    assert again["summaries"]["eval"] == ev

    shipped = ship(work, work / "weights", results, work / "results")
    assert shipped["meta_lora"].startswith("meta-recycle")
    assert (work / "weights" / "mini-vit" / "model.safetensors").is_file()
    assert read_adapter(work / "weights" / "example-lora").head_weight is not None  # for the inversion tab
    prior_card = (work / "weights" / "glyph-prior" / "README.md").read_text()  # the BN prior for mini-vit
    assert load_bn_prior(str(work / "weights" / "glyph-prior")).bns
    assert f"train accuracy {results['summaries']['prior']['train_acc']:.4f}" in prior_card
    assert results["summaries"]["prior"]["recoloured_copies"] == cfg.prior_recolour > 0
    assert f"{cfg.prior_recolour} copies of each image in random ink and paper colours" in prior_card
    assert "without any real training data" in (work / "weights" / "mini-meta-lora" / "README.md").read_text()
    examples = work / "weights" / "examples"
    assert len(list((examples / "han-1" / "support").iterdir())) == 5
    scores = json.loads((examples / "scores.json").read_text())
    assert sorted(scores["tasks"]) == sorted(p.name for p in examples.iterdir() if p.is_dir())
    assert scores["test_tasks_total"]["NN"][1] == scores["test_tasks_total"]["meta-LoRA"][1] == 8 * 5 * 3
    readme = (work / "weights" / "README.md").read_text()  # written from the results, never by hand
    assert "python -m reproduce.pipeline --work .cache/repro --preset toy --ship weights" in readme  # its preset
    shipped_name = method_name(shipped["meta_lora"][len("meta-") :])
    nn = results["summaries"]["eval"]["test-1shot"]["results"]["NN"]
    assert f"the backbone alone (NN) {nn['mean']:.2f} ± {nn['ci95']:.2f}" in readme and f"`{shipped_name}`" in readme
    total = scores["test_tasks_total"]["meta-LoRA"]
    assert f"{total[0]} of {total[1]} queries correctly with the meta-LoRA" in readme
    recheck = json.loads((work / "weights" / "mini-meta-lora" / "recheck.json").read_text())
    assert set(recheck["results"]) == {"NN", "meta-LoRA"} and recheck["tolerance"] > 0
    assert (work / "results" / "results.md").read_text() == (work / "results.md").read_text()
    assert (work / "results" / "surrogates.png").is_file()

    text = report(work, steps=4, cfg=cfg)  # reproduce.diagnose on the same work folder
    curve = [line for line in text.splitlines() if line.startswith("| val accuracy |")][0].split("|")[2:-1]
    assert len([line for line in text.splitlines() if line.startswith("| held-out Hangul accuracy |")]) == 1
    m = cfg.meta
    nn = evaluate(
        load_backbone(str(work / "mini-vit"), device="cpu"),
        work / "data" / "val",
        {"NN": None},
        EvalConfig(m.way, m.shot, m.query, m.val_episodes, seed=123),
    )["results"]["NN"]["mean"]
    # the oracle's validation curve (steps 0, 3, 6); step 0 is the bare backbone
    assert len(curve) == 3 and float(curve[0]) == pytest.approx(nn, abs=0.01)
    assert text.count("% masked |") == 3


@pytest.mark.skipif(not (WEIGHTS / "mini-meta-lora" / "recheck.json").is_file(), reason="no shipped weights yet")
def test_shipped_weights_reproduce_their_recorded_accuracy(tmp_path):
    from reproduce.glyphs import SplitSpec, build

    recheck = json.loads((WEIGHTS / "mini-meta-lora" / "recheck.json").read_text())
    build(tmp_path, SplitSpec(**recheck["data"]), only=("test",))
    backbone = load_backbone(str(WEIGHTS / "mini-vit"), device="cpu")
    methods = {"NN": None, "meta-LoRA": read_adapter(WEIGHTS / "mini-meta-lora", backbone)}
    report = evaluate(backbone, tmp_path / "test", methods, EvalConfig(**recheck["eval"]))
    for method, expected in recheck["results"].items():
        assert abs(report["results"][method]["mean"] - expected) <= recheck["tolerance"], (method, report)


def test_clutter_style_adds_fragments_at_the_edges_only():
    import random

    import numpy as np
    from PIL import ImageFont

    from reproduce.glyphs import FONTS, SplitSpec, render

    font = ImageFont.truetype(FONTS["fonts-ipafont-gothic"], size=83)
    plain = np.asarray(render("永", font, random.Random(0), augment=False), dtype=float)
    cluttered = [
        np.asarray(
            render("永", font, random.Random(s), augment=False, style="clutter", distractors="木水火土"), dtype=float
        )
        for s in range(8)
    ]
    border = np.ones((32, 32), bool)
    border[3:-3, 3:-3] = False
    assert plain[border].min() == 255  # a plain glyph leaves the edges blank
    assert all(c[border].min() < 128 for c in cluttered)  # every cluttered one has ink there
    assert all(np.abs(c - plain)[12:20, 12:20].mean() < 10 for c in cluttered)  # the class glyph stays
    with pytest.raises(ValueError, match="distractor"):
        render("永", font, random.Random(0), style="clutter")
    with pytest.raises(ValueError, match="clutter=-1"):
        SplitSpec(clutter=-1)


def test_a_hangul_source_keeps_han_out_of_pretraining_and_kana_for_the_cross_domain(tmp_path):
    import unicodedata

    from reproduce.glyphs import SplitSpec, build

    spec = SplitSpec(
        pretrain=6,
        zoo=5,
        val=5,
        test=5,
        cross=5,
        train_aug=1,
        eval_aug=1,
        cross_aug=1,
        source_script="hangul",
        cross_script="kana",
    )
    manifest = build(tmp_path, spec)
    assert manifest["fonts"]["hangul"] == ["fonts-wqy-microhei", "fonts-wqy-zenhei", "fonts-unifont"]
    scripts = {
        "pretrain": "HANGUL SYLLABLE",
        "zoo": "CJK UNIFIED",
        "val": "CJK UNIFIED",
        "test": "CJK UNIFIED",
        "cross": ("HIRAGANA LETTER", "KATAKANA LETTER"),
    }
    for split, prefix in scripts.items():
        classes = [p.name for p in (tmp_path / split).iterdir()]
        assert len(classes) == getattr(spec, split)
        assert all(unicodedata.name(c).startswith(prefix) and "SMALL" not in unicodedata.name(c) for c in classes)
    assert len(list((tmp_path / "pretrain").rglob("*.png"))) == 6 * 3  # Hangul: the three fonts that have it
    for bad in (dict(source_script="kana"), dict(cross_script="han"), dict(source_script="hangul")):
        with pytest.raises(ValueError, match="script"):
            SplitSpec(**bad)


def test_zoo_aug_renders_the_zoo_denser_and_leaves_every_other_split_alone(tmp_path):
    import json

    from reproduce.glyphs import SplitSpec, build

    small = dict(pretrain=3, zoo=2, val=2, test=2, cross=2, train_aug=1, eval_aug=1, cross_aug=1)
    build(tmp_path / "a", SplitSpec(**small))
    build(tmp_path / "b", SplitSpec(**small, zoo_aug=3))
    for split in ("pretrain", "zoo", "val", "test", "cross"):
        a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / split).rglob("*.png"))
        b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / split).rglob("*.png"))
        if split == "zoo":
            assert len(b) == 3 * len(a) and set(a) < set(b)
        else:  # the same files, pixel for pixel
            assert a == b and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in a)
    # A manifest written before `zoo_aug` existed still matches the spec it was rendered with, and only that one.
    manifest = tmp_path / "a" / "splits.json"
    old = json.loads(manifest.read_text())
    del old["spec"]["zoo_aug"]
    manifest.write_text(json.dumps(old))
    build(tmp_path / "a", SplitSpec(**small))
    with pytest.raises(ValueError, match="other settings"):
        build(tmp_path / "a", SplitSpec(**small, zoo_aug=3))
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=f"zoo_aug={bad}"):
            SplitSpec(zoo_aug=bad)


def test_recolour_paints_plain_glyphs_in_random_ink_and_paper_of_either_polarity():
    import random

    import numpy as np
    import torch
    from PIL import ImageFont

    from recycle.priors import LUMA
    from reproduce.glyphs import FONTS, recolour, render

    font = ImageFont.truetype(FONTS["fonts-ipafont-gothic"], size=83)
    plain = torch.from_numpy(np.array(render("永", font, random.Random(0), augment=False))).permute(2, 0, 1)
    x = plain.expand(64, -1, -1, -1)
    out = recolour(x, torch.Generator().manual_seed(0), min_contrast=0.35)
    assert out.shape == x.shape and out.dtype == torch.uint8
    ink_mask, paper_mask = plain[0] < 20, plain[0] > 235
    ink = out[:, :, ink_mask].float().mean(-1) / 255  # (64, 3) colours where the glyph is
    paper = out[:, :, paper_mask].float().mean(-1) / 255
    contrast = (ink - paper) @ torch.tensor(LUMA)
    assert contrast.abs().min() >= 0.33  # the glyph stays readable
    assert (contrast > 0).any() and (contrast < 0).any()  # light-on-dark and dark-on-light both occur
    assert paper.std(0).min() > 0.15  # colours vary from image to image
    again = recolour(x, torch.Generator().manual_seed(0), min_contrast=0.35)
    assert torch.equal(out, again)  # seeded
    with pytest.raises(ValueError, match="prior_recolour=-1"):
        ReproConfig(prior_recolour=-1)


def test_source_extra_adds_every_letter_of_a_script_to_pretraining_and_check_style_renders_the_test_classes(tmp_path):
    import unicodedata

    import numpy as np

    from reproduce.glyphs import SplitSpec, build

    small = dict(pretrain=3, zoo=2, val=2, test=2, cross=2, train_aug=1, eval_aug=1, cross_aug=1)
    manifest = build(tmp_path / "b", SplitSpec(**small, source_extra=["kana"], check_style="plain"))
    base = build(tmp_path / "a", SplitSpec(**small))
    pretrain = [p.name for p in (tmp_path / "b" / "pretrain").iterdir()]
    kana = [c for c in pretrain if unicodedata.name(c).startswith(("HIRAGANA", "KATAKANA"))]
    assert len(kana) == base["available"]["kana"] == manifest["splits"]["pretrain"] - 3 > 100
    written = json.loads((tmp_path / "b" / "splits.json").read_text())
    assert written["spec"]["source_extra"] == ["kana"]  # JSON holds a list, and it still matches its own spec
    build(tmp_path / "b", SplitSpec(**small, source_extra=("kana",), check_style="plain"))
    # the check split: the test characters, in the foundation's plain style; every other split is unchanged
    tinted = sorted(p.relative_to(tmp_path / "b" / "test") for p in (tmp_path / "b" / "test").rglob("*.png"))
    plain = sorted(p.relative_to(tmp_path / "b" / "test-plain") for p in (tmp_path / "b" / "test-plain").rglob("*.png"))
    assert tinted == plain and manifest["splits"]["test-plain"] == 2
    for f in plain:
        with Image.open(tmp_path / "b" / "test-plain" / f) as im:
            r, g, b = (np.asarray(c, dtype=float) for c in im.split())
        assert np.abs(r - g).max() == 0 and np.abs(g - b).max() == 0  # grey: ink and paper uncoloured
    for split in ("zoo", "val", "test", "cross"):
        a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / split).rglob("*.png"))
        assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in a)
    for bad, field in (
        (dict(source_extra=("hangul",)), "source_extra"),
        (dict(source_extra=("han",)), "source_extra"),
        (dict(source_extra=("kana", "kana")), "source_extra"),
        (dict(check_style="neon"), "check_style"),
    ):
        with pytest.raises(ValueError, match=field):
            SplitSpec(**bad)


def test_contrastive_views_and_loss():
    import torch

    from reproduce.foundation import ContrastConfig, nt_xent, views

    x = torch.full((64, 3, 32, 32), 250, dtype=torch.uint8)
    x[:, :, 8:24, 14:18] = 10  # a dark bar on light paper
    out = views(x, ContrastConfig(colour=1.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out[:, 0] != out[:, 1]).any() and not torch.equal(out[0], out[1])  # coloured, and each view its own
    plain = views(x, ContrastConfig(colour=0.0, rotate=0, scale=(1, 1), shift=0), torch.Generator().manual_seed(0))
    assert (plain.int() - x.int()).abs().max() <= 1  # no warp, no colour: the image itself
    still = dict(colour=0.0, rotate=0, scale=(1, 1), shift=0)
    bolder = views(x, ContrastConfig(**still, stroke=1.0), torch.Generator().manual_seed(0))
    ink = (x[:, 0] < 128).sum((1, 2)).float()
    changed = (bolder[:, 0] < 128).sum((1, 2)).float() - ink  # each view's strokes grow or shrink, by its own amount
    assert changed.max() > 0 and changed.min() < 0
    warped = views(x, ContrastConfig(**still, elastic=2.0), torch.Generator().manual_seed(0))
    assert (warped.int() - x.int()).abs().max() > 100  # the bar's edges move
    blurred = views(x, ContrastConfig(**still, blur=1.0), torch.Generator().manual_seed(0))
    assert ((blurred[:, 0] > 20) & (blurred[:, 0] < 240)).any()  # grey edge pixels appear; the paper stays
    assert blurred[:, :, :4].eq(250).all()
    z = torch.randn(8, 16)
    loss, acc = nt_xent(torch.cat([z, z]), temperature=0.1)  # each view's positive is itself: a perfect match
    assert acc == 1 and loss < 0.5
    loss_random, _ = nt_xent(torch.randn(16, 16), temperature=0.1)
    assert loss_random > loss
    for bad in (
        dict(temperature=0),
        dict(colour=1.5),
        dict(scale=(1.2, 0.8)),
        dict(batch=1),
        dict(lr=float("nan")),
        dict(stroke=1.5),
        dict(elastic=-1),
        dict(blur=2),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ContrastConfig(**bad)


@pytest.mark.skipif(not (WEIGHTS / "examples" / "scores.json").is_file(), reason="no shipped example scores")
def test_the_shipped_weights_readme_is_written_from_the_results():
    """weights/README.md is exactly what reproduce.report writes from the committed results and example scores."""
    from reproduce.report import weights_readme

    results = json.loads((WEIGHTS.parent / "reproduce" / "results" / "results.json").read_text())
    scores = json.loads((WEIGHTS / "examples" / "scores.json").read_text())
    run = read_adapter(WEIGHTS / "mini-meta-lora").info.get("run", "recycle")
    sizes = {
        d: sum(f.stat().st_size for f in (WEIGHTS / d).rglob("*") if f.is_file()) / 1e6
        for d in ("mini-vit", "mini-meta-lora", "example-lora", "glyph-prior")
    }
    assert (WEIGHTS / "README.md").read_text() == weights_readme(results, run, scores, sizes)
    tasks = sorted(p.name for p in (WEIGHTS / "examples").iterdir() if p.is_dir())
    assert sorted(scores["tasks"]) == tasks and len([t for t in tasks if t[4:].isdigit()]) == 8
    from reproduce.ship import score_examples  # the recorded scores are what the shipped models answer now

    backbone = load_backbone(str(WEIGHTS / "mini-vit"), device="cpu")
    answered = score_examples(backbone, read_adapter(WEIGHTS / "mini-meta-lora"), WEIGHTS / "examples")
    assert answered == {k: v for k, v in scores.items() if k != "test_split"}


def test_a_two_phase_foundation_resumes_from_its_first_phase(tmp_path, monkeypatch):
    """With `contrast_font`, the first phase's model is kept until the stage ends: an interrupted second phase
    restarts from it, without training the first phase again."""
    import timm
    import torch

    import reproduce.pipeline as pipeline
    from reproduce.foundation import ContrastConfig

    cfg = ReproConfig.toy()
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5)
    calls = []
    real = pipeline.pretrain_contrastive

    def counting(model, x, config, *args, **kwargs):
        calls.append(config)
        if config is cfg.contrast_font and len(calls) == 2:
            raise KeyboardInterrupt  # interrupted in the second phase
        if len(calls) == 3:  # the restarted second phase starts from the first phase's weights
            from safetensors.torch import load_file

            kept = load_file(str(tmp_path / "phase1" / "model.safetensors"))
            assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
        return real(model, x, config, *args, **kwargs)

    monkeypatch.setattr(pipeline, "pretrain_contrastive", counting)

    def model():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **cfg.vit)

    first = model()
    with pytest.raises(KeyboardInterrupt):
        pipeline._pretrain_in_phases(cfg, first, x, mean, std, tmp_path / "phase1")
    assert (tmp_path / "phase1" / "summary.json").is_file()
    again = model()
    summary = pipeline._pretrain_in_phases(cfg, again, x, mean, std, tmp_path / "phase1")
    assert calls == [cfg.contrast, cfg.contrast_font, cfg.contrast_font]  # the first phase ran once
    assert set(summary) >= {"loss", "positive_match", "first_phase"}
    assert isinstance(cfg.contrast_font, ContrastConfig) and cfg.contrast_font.stroke > 0


def test_the_shipped_run_is_the_best_meta_trained_one_on_validation():
    def runs(**best):  # run -> (best validation accuracy, its step)
        return {f"meta-{k.replace('_', '-')}": {"best_val": v, "best_step": t} for k, (v, t) in best.items()}

    assert shipped_run(runs(recycle=(0.42, 500), recycle_75=(0.44, 250), oracle=(0.9, 9))) == "meta-recycle-75"
    # the run from the LoRAs-average validating best at step 0 is that average, not a meta-LoRA
    s = runs(recycle=(0.42, 500), recycle_from_average=(0.46, 0), recycle_75=(0.41, 250))
    assert shipped_run(s) == "meta-recycle"
    s = runs(recycle=(0.42, 500), recycle_from_average=(0.47, 750))
    assert shipped_run(s) == "meta-recycle-from-average"
    assert shipped_run(runs(recycle=(0.40, 0), recycle_from_average=(0.46, 0))) == "meta-recycle"  # the identity


def test_targets_are_met_or_missed_by_the_numbers():
    """Each target's verdict follows its measured numbers: intervals that overlap are not "apart", a 75% run one
    point behind is within reach only with a 2.5x faster step, and damage on the plain split is judged at -1."""

    def r(mean: float, ci: float = 0.5) -> dict:
        return {"mean": mean, "ci95": ci}

    one = {"NN": r(46), "LoRAs-average + NN": r(49), "LoRA Recycle": r(51.2), "LoRA Recycle-75": r(50.3)}
    one["Oracle (real zoo images)"] = r(55)
    results = {
        "config": {"data": {"check_style": "plain"}},
        "total_seconds": 149 * 60,
        "summaries": {
            "eval": {
                "test-1shot": {"results": one},
                "test-5shot": {"results": {"NN": r(60), "LoRA Recycle": r(62.5)}},
                "test-plain-1shot": {"results": {"NN": r(70), "LoRA Recycle": r(69.1)}},
            },
            "meta-recycle": {"step_seconds_median": 0.25},
            "meta-recycle-75": {"step_seconds_median": 0.1},
            "invert": {"teacher_accuracy": 0.9},
        },
    }
    assert all(ok for _, _, ok in targets(results))
    one["LoRA Recycle"] = r(51.2, 5.0)  # +5.2, but its interval reaches NN's and the average's
    one["Oracle (real zoo images)"] = r(53.9)
    results["summaries"]["meta-recycle-75"]["step_seconds_median"] = 0.11  # 2.27x
    results["summaries"]["eval"]["test-plain-1shot"]["results"]["LoRA Recycle"] = r(68.9)
    results["total_seconds"] = 151 * 60
    missed = {t for t, _, ok in targets(results) if not ok}
    assert missed == {
        "Oracle − NN ≥ 8",
        "LoRA Recycle − NN ≥ 5, intervals apart",
        "LoRA Recycle above LoRAs-average + NN, intervals apart",
        "75% masked within 1 point of unmasked, step ≥ 2.5× faster",
        "No damage: LoRA Recycle ≥ NN − 1 on Han plain 1-shot",
        "Pipeline ≤ 150 minutes",
    }
    del one["LoRA Recycle-75"]
    assert targets(results) == []  # a run without the rows it compares has no targets


def test_a_shipped_foundation_is_reused_only_when_its_run_had_the_same_settings(tmp_path):
    """``--reuse-foundation``: the toy run's foundation and prior, copied as shipped, seed a new work folder with the
    stage times and summaries the run recorded; other foundation settings are refused by name."""
    import shutil

    from reproduce.pipeline import reuse_foundation

    work, results = require_toy_run()
    weights = tmp_path / "weights"
    shutil.copytree(work / "mini-vit", weights / "mini-vit")
    shutil.copytree(work / "prior", weights / "glyph-prior")
    recorded = tmp_path / "results.json"
    recorded.write_text(json.dumps(results))
    cfg = ReproConfig.toy()
    with pytest.raises(ValueError, match=r"other settings for pretrain_steps"):
        reuse_foundation(tmp_path / "other", replace(cfg, pretrain_steps=cfg.pretrain_steps + 1), weights, recorded)
    seeded = tmp_path / "seeded"
    seeded.mkdir()
    reuse_foundation(seeded, replace(cfg, meta=replace(cfg.meta, steps=7)), weights, recorded)  # meta may differ
    for stage, folder in (("pretrain", "mini-vit"), ("prior", "prior")):
        marker = json.loads((seeded / f"{stage}.done.json").read_text())
        assert marker["seconds"] == results["timings_seconds"][stage] and "reused_from" in marker
        assert (seeded / folder / "model.safetensors").read_bytes() == (
            work / folder / "model.safetensors"
        ).read_bytes()


def test_the_shipped_test_split_the_app_shows_is_the_results_files():
    from reproduce.ship import test_split_summary

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "reproduce" / "results" / "results.json").read_text())
    scores = json.loads((root / "weights" / "examples" / "scores.json").read_text())
    assert scores["test_split"] == test_split_summary(results)

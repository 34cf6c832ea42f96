"""Shipping a finished run: the backbone, its BN prior, the meta-LoRA chosen on validation, an example LoRA and the
example tasks go into ``weights/``, each with a card written from the run's results; the results table, numbers and
figures go into ``reproduce/results/``."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from recycle.backbone import Backbone, load_backbone
from recycle.evaluate import EvalConfig, evaluate
from recycle.formats import LoRAAdapter, read_adapter, save_adapter
from recycle.images import load_image
from recycle.priors import save_prior_settings
from recycle.io import atomic_write_bytes
from recycle.predict import LABEL_SEPARATOR
from recycle.zoo import load_zoo

from .report import method_name, pipeline_command, prior_card, results_markdown, source_description, weights_readme

_logger = logging.getLogger("reproduce")


# The bundled example tasks, by a rule fixed before any third-generation result was seen: task i = 1..8 of the test
# split is 5-way, 1 shot (i <= 4) or 2, with 3 queries per class, drawn with seed 1000 + i; then one 5-way 1-shot task
# of the cross-domain script and one of the test characters in the check style, both with seed 2000. Query files are
# named ``<class>__<k>.png``, so the app can count its correct answers (`recycle.predict.query_label`).
EXAMPLE_TASKS = 8


def write_examples(data: Path, out: Path, cross: str, check_style: Optional[str]) -> list[str]:
    """Write the example tasks into `out` (``<task>/{support,query}/<class>/*.png``); returns the task names."""
    from .glyphs import example_task

    plan = [(f"han-{i}", "test", 1 if i <= EXAMPLE_TASKS // 2 else 2, 1000 + i) for i in range(1, EXAMPLE_TASKS + 1)]
    plan.append((cross, "cross", 1, 2000))
    if check_style:
        plan.append((f"han-{check_style}", f"test-{check_style}", 1, 2000))
    names = []
    for name, split, shots, seed in plan:
        task = example_task(data / split, 5, seed=seed, shots=shots, queries=3)
        if task is None:
            _logger.warning("ship: split %s has fewer than 5 classes; no example task %s", split, name)
            continue
        for cls, files in task.items():
            for i, f in enumerate(files):
                d = out / name / ("support" if i < shots else "query") / cls
                d.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, d / (f.name if i < shots else f"{cls}{LABEL_SEPARATOR}{i - shots}.png"))
        names.append(name)
    return names


def score_examples(backbone: Backbone, lora: LoRAAdapter, examples: Path) -> dict:
    """Correct answers on the example tasks' queries, with the meta-LoRA and with the backbone alone, as the app
    computes them (`recycle.fewshot.FewShotClassifier`)."""
    from recycle.fewshot import FewShotClassifier
    from recycle.predict import read_support_folder

    tasks, totals = {}, {"NN": [0, 0], "meta-LoRA": [0, 0]}
    for task in sorted(p for p in examples.iterdir() if p.is_dir()):
        support = read_support_folder(task / "support")
        images = [load_image(f) for files in support.values() for f in files]
        labels = [c for c, files in support.items() for _ in files]
        queries = sorted((task / "query").glob("*/*.png"))
        truth = [q.parent.name for q in queries]
        tasks[task.name] = {}
        for method, adapter in (("NN", None), ("meta-LoRA", lora)):
            predicted = (
                FewShotClassifier(backbone, adapter).fit(images, labels).predict([load_image(q) for q in queries])
            )
            correct = sum(p == t for p, t in zip(predicted, truth))
            tasks[task.name][method] = [correct, len(queries)]
            if task.name.startswith("han-") and task.name[4:].isdigit():  # the test split's tasks
                totals[method] = [totals[method][0] + correct, totals[method][1] + len(queries)]
    return {"tasks": tasks, "test_tasks_total": totals}


def test_split_summary(results: dict) -> dict:
    """What the shipped meta-LoRA and the backbone alone scored on the test split, 5-way 1-shot (mean accuracy %,
    its 95% interval, episodes): the app shows it beside one task's score, so that a task reads as one sample."""
    best = shipped_run(results["summaries"])[len("meta-") :]
    report = results["summaries"]["eval"]["test-1shot"]["results"]
    pick = {"meta-LoRA": method_name(best), "NN": "NN"}
    return {
        "way": 5,
        "shot": 1,
        "episodes": results["config"]["episodes"],
        "method": pick["meta-LoRA"],
        **{k: {"mean": report[v]["mean"], "ci95": report[v]["ci95"]} for k, v in pick.items()},
    }


def shipped_run(summaries: dict) -> str:
    """The meta-training stage (``meta-recycle…``) whose exported meta-LoRA validated best. A run whose best is its
    step 0 exported its start: the identity, or for the run from the LoRAs-average that average, which is no
    meta-LoRA; meta-trained states come first, and the identity only when no run has one."""
    candidates = [k for k in summaries if k.startswith("meta-recycle")]
    trained = [k for k in candidates if summaries[k]["best_step"] != 0]
    pool = trained or [k for k in candidates if not k.endswith("-from-average")]
    return max(pool, key=lambda k: summaries[k]["best_val"])


def ship(work: Path, weights: Path, results: dict, results_dir: Optional[Path] = None) -> dict:
    """Copy the mini backbone, its glyph BN prior, the best meta-LoRA (chosen on the validation split) and example
    tasks into `weights`, and the results table, JSON and plot into `results_dir`."""
    from recycle.card import write_model_card

    s = results["summaries"]
    command = pipeline_command(results)
    best = shipped_run(s)
    if s[best]["best_step"] == 0:  # meta_train exported the identity: no step beat the bare backbone on validation
        _logger.warning(
            "ship: no meta-training run beat the bare backbone on validation; the shipped meta-LoRA is "
            "the identity (%s at step 0)",
            best,
        )
    vit_out, lora_out, examples = weights / "mini-vit", weights / "mini-meta-lora", weights / "examples"
    example_lora, prior_out = weights / "example-lora", weights / "glyph-prior"
    for d in (vit_out, lora_out, examples, example_lora, prior_out):
        shutil.rmtree(d, ignore_errors=True)
    for source, out in ((work / "mini-vit", vit_out), (work / "prior", prior_out)):
        out.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(source / f, out / f)
    # The run's inversion settings beside the prior: the app's inversion tab inverts with them on mini-vit
    look = save_prior_settings(prior_out, results["config"]["invert"])
    atomic_write_bytes(
        prior_out / "README.md",
        prior_card(s["prior"], results["config"]["prior_steps"], source_description(s["data"]), look, command).encode(),
    )
    table = results_markdown(results)
    adapter = read_adapter(work / best / "meta-lora")
    adapter.backbone = "weights/mini-vit"
    save_adapter(adapter, lora_out)
    write_model_card(lora_out, adapter, command=command, results_md=table)
    size = sum(f.stat().st_size for f in vit_out.iterdir()) / 1e6
    (vit_out / "README.md").write_text(
        "# mini-vit: the offline stand-in for a vision foundation model\n\n"
        f"A timm ViT ({json.dumps(results['config']['vit'])}, {s['pretrain']['params'] / 1e6:.2f} M parameters, "
        f"{size:.1f} MB) pretrained by `reproduce/pipeline.py` "
        + (
            "by contrast between random views, without labels, on "
            if s["pretrain"].get("objective") == "contrast"
            else "to classify "
        )
        + f"{s['pretrain']['classes']} classes of {source_description(s['data'])}. Load it with "
        "`recycle.backbone.load_backbone('weights/mini-vit')` or "
        "`timm.create_model('local-dir:weights/mini-vit', pretrained=True)`.\n\n"
        f"Command: `{command}`.\n\n## Results\n\n" + table
    )
    # A small seeded re-evaluation that CI repeats on freshly rendered test images (tests/test_reproduce.py).
    recheck_cfg = EvalConfig(5, 1, results["config"]["eval_query"], 40, seed=7)
    report = evaluate(
        load_backbone(str(vit_out), device="cpu"),
        work / "data" / "test",
        {"NN": None, "meta-LoRA": read_adapter(lora_out)},
        recheck_cfg,
    )
    recheck = {
        "data": results["config"]["data"],
        "eval": asdict(recheck_cfg),
        "tolerance": 1.0,
        "results": {m: r["mean"] for m, r in report["results"].items()},
    }
    atomic_write_bytes(lora_out / "recheck.json", json.dumps(recheck, indent=1).encode())
    # One zoo LoRA (with its head) for the app's inversion tab.
    zoo_name, zoo_lora = load_zoo(work / "zoo")[0]
    zoo_lora.backbone = "weights/mini-vit"
    save_adapter(zoo_lora, example_lora)
    write_model_card(
        example_lora,
        zoo_lora,
        command=command,
        results_md=f"`{zoo_name}` of the zoo, tuned on real images of its classes.\n",
    )
    data_spec = results["config"]["data"]
    write_examples(work / "data", examples, data_spec.get("cross_script", "hangul"), data_spec.get("check_style"))
    scores = score_examples(load_backbone(str(vit_out), device="cpu"), read_adapter(lora_out), examples)
    scores["test_split"] = test_split_summary(results)
    atomic_write_bytes(examples / "scores.json", json.dumps(scores, indent=1).encode())
    sizes = {
        d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6
        for d in (vit_out, lora_out, example_lora, prior_out)
    }
    atomic_write_bytes(weights / "README.md", weights_readme(results, best[len("meta-") :], scores, sizes).encode())
    if results_dir is not None:  # the run's table, numbers and plot, for the repository
        results_dir.mkdir(parents=True, exist_ok=True)
        for f in ("results.md", "results.json", "results.png", "surrogates.png"):
            atomic_write_bytes(results_dir / f, (work / f).read_bytes())
    return {"meta_lora": best, "identity": s[best]["best_step"] == 0, "backbone_mb": round(size, 2)}

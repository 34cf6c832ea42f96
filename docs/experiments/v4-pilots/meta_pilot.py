"""A v4 meta-training pilot on a pilot work folder's pools: one meta-training run with `MetaConfig` overrides, then
the gate's three measures, on validation classes only.

    python docs/experiments/v4-pilots/meta_pilot.py WORK NAME '{"views": {"stroke": 0.4}, "steps": 500}' [--masked]

WORK is a `reproduce.pipeline` work folder run at least to its `surrogates` stage (`v3-pilot` preset or a variant).
Writes ``WORK/pilots/NAME/`` (the run) and ``WORK/pilots/NAME.json``:
- ``structure``: NN, LoRAs-average + NN and this meta-LoRA on the structure check's 300 validation episodes (seed 99);
- ``difficulty``: NN on 1-shot surrogate episodes drawn with the run's views against real episodes of the same
  classes (`reproduce.surrogates.task_difficulty`, 200 episodes, seed 3);
- ``validation``: the run's validation curve (100 episodes, seed 123, as the pipeline validates).
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

from recycle.adapter import average_loras  # noqa: E402
from recycle.backbone import load_backbone  # noqa: E402
from recycle.episodes import PoolEpisodes, PoolTeachers  # noqa: E402
from recycle.evaluate import EvalConfig, evaluate  # noqa: E402
from recycle.formats import read_adapter  # noqa: E402
from recycle.pool import Pool  # noqa: E402
from recycle.zoo import load_zoo  # noqa: E402
from reproduce.pipeline import PRESETS, stage_meta  # noqa: E402
from reproduce.surrogates import task_difficulty  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="MetaConfig fields as JSON")
    parser.add_argument("--preset", default="v3-pilot")
    parser.add_argument("--pool", default="pool-75", help="the pool folder in WORK (default: %(default)s)")
    parser.add_argument("--masked", action="store_true", help="meta-train on the kept tokens")
    parser.add_argument("--temperature", type=float, default=0.25, help="the KL target's (v3 chose 0.25)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    cfg = PRESETS[args.preset]()
    fields = json.loads(args.overrides)
    meta = replace(cfg.meta, **fields)  # a `views` dict becomes a ViewConfig in MetaConfig.__post_init__
    cfg = replace(cfg, meta=meta)
    work, data = args.work, args.work / "data"
    backbone = load_backbone(str(work / "mini-vit"), device="cpu")
    out = work / "pilots" / args.name
    t0 = time.perf_counter()
    pool = Pool(work / args.pool)
    teachers = (
        PoolTeachers(backbone, [a for _, a in load_zoo(work / "zoo", backbone)]) if meta.teacher_on_views else None
    )
    summary = stage_meta(
        cfg,
        backbone,
        args.name,
        PoolEpisodes(pool, meta.spec, args.masked),
        args.masked,
        data,
        out,
        temperature=args.temperature,
        teachers=teachers,
    )

    seconds = time.perf_counter() - t0
    methods = {
        "NN": None,
        "LoRAs-average + NN": average_loras([a for _, a in load_zoo(work / "zoo", backbone)]),
        "LoRA Recycle": read_adapter(out / "meta-lora"),
    }
    report = evaluate(backbone, data / "val", methods, EvalConfig(5, 1, 15, 300, seed=99))
    difficulty = task_difficulty(backbone, work / args.pool, data / "zoo", 200, 5, 1, 15, seed=3, views=meta.views)
    result = {
        "overrides": fields,
        "masked": args.masked,
        "pool": args.pool,
        "temperature": args.temperature,
        "structure": {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in report["results"].items()},
        "difficulty": difficulty,
        "validation": summary["val_curve"],
        "best_step": summary["best_step"],
        "train_seconds": round(seconds, 1),
    }
    (work / "pilots" / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    s = result["structure"]
    print(
        "PILOT",
        args.name,
        json.dumps(fields),
        "masked" if args.masked else "unmasked",
        "| NN %.2f avg %.2f recycle %.2f ± %.2f (step %s) | surrogate NN %.2f real %.2f"
        % (
            s["NN"]["mean"],
            s["LoRAs-average + NN"]["mean"],
            s["LoRA Recycle"]["mean"],
            s["LoRA Recycle"]["ci95"],
            summary["best_step"],
            difficulty["surrogate"]["mean"],
            difficulty["real"]["mean"],
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

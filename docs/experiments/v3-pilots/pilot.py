"""A v3 structure pilot: the `v3-pilot` preset with overrides, run up to the structure check (validation only).

    python docs/experiments/v3-pilots/pilot.py WORK [--from DONE_WORK] [--until STAGE] [contrast.colour=0.5 ...]

`--from` copies the data and prior stages (and their done markers) of an earlier pilot, so pilots that change only
the foundation share them. Overrides are ``field=value`` or ``section.field=value`` of `ReproConfig`, parsed as JSON.
"""
import argparse
import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from reproduce.pipeline import ReproConfig, run  # noqa: E402


def override(cfg: ReproConfig, items: list[str]) -> ReproConfig:
    for item in items:
        key, _, raw = item.partition("=")
        value = json.loads(raw)
        if "." in key:
            section, field = key.split(".", 1)
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{field: value})})
        else:
            cfg = replace(cfg, **{key: value})
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--from", dest="source", type=Path)
    parser.add_argument("--until", default="structure", help="the last stage to run (default: structure)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = override(ReproConfig.v3_pilot(), args.overrides)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.source:
        for name in ("data", "prior"):
            if not (args.work / name).exists():
                shutil.copytree(args.source / name, args.work / name)
                shutil.copy2(args.source / f"{name}.done.json", args.work / f"{name}.done.json")
    result = run(args.work, cfg, until=args.until)
    print("PILOT", args.work, args.overrides, json.dumps(result["summaries"]["pretrain"]),
          json.dumps({k: v["mean"] for k, v in result["summaries"]["structure"]["results"].items()}), flush=True)


if __name__ == "__main__":
    main()

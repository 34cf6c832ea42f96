"""The pilot table of README.md, from the pilots' JSON files (written by meta_pilot.py) in this folder's results/.

python docs/experiments/v4-pilots/table.py
"""

import json
from pathlib import Path

here = Path(__file__).resolve().parent
# The inversion each pilot's pool came from, by the pilot's name (results/pool-*.json: its stage summaries).
POOLS = {
    "b48": ("per-class batches (`invert.batch_size=48`)", "pool-b48"),
    "div05": ("diversity term 0.5", "pool-div05"),
}


def pool_of(stem: str) -> str:
    for key, (what, summary) in POOLS.items():
        if f"-{key}" in stem:
            agreement = json.loads((here / "results" / f"{summary}.json").read_text())["invert"]["teacher_accuracy"]
            return f"{what}; agreement {agreement:.4f}"
    agreement = json.loads((here / "results" / "pool-v3.json").read_text())["invert"]["teacher_accuracy"]
    return f"v3 inversion; agreement {agreement:.4f}"


print(
    "| pilot | pool | meta-training | NN on surrogate / real 1-shot episodes | validation by step (100) | "
    "LoRA Recycle (300 structure episodes) | NN | LoRAs-average |"
)
print("|---|---|---|---|---|---|---|---|")
for path in sorted((here / "results").glob("p[0-9]*.json"), key=lambda p: int(p.stem[1:].split("-")[0])):
    r = json.loads(path.read_text())
    s, d = r["structure"], r["difficulty"]
    curve = ", ".join(f"{100 * a:.2f}" for _, a in r["validation"])
    changes = json.dumps(r["overrides"]) if r["overrides"] else "as v3 (500 steps)"
    recycle = s["LoRA Recycle"]
    print(
        f"| {path.stem} | {pool_of(path.stem)} | `{changes}` | {d['surrogate']['mean']:.2f} / "
        f"{d['real']['mean']:.2f} | {curve} | {recycle['mean']:.2f} ± {recycle['ci95']:.2f} (step {r['best_step']}) "
        f"| {s['NN']['mean']:.2f} | {s['LoRAs-average + NN']['mean']:.2f} |"
    )

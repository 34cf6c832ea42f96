"""How much do colours cost a foundation? NN (300 5-way 1-shot validation episodes, seed 99) on the validation
characters rendered plain and tinted at two higher minimum contrasts, beside the pilot's own tinted split.

    python docs/experiments/v3-pilots/colour_check.py WORK/data WORK/vit-3000 OUT

DATA is a pilot's rendered data folder (its splits.json gives the settings); OUT receives the re-rendered splits.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

from recycle.backbone import load_backbone  # noqa: E402
from recycle.evaluate import EvalConfig, evaluate  # noqa: E402
from reproduce.glyphs import SplitSpec, build  # noqa: E402

torch.set_num_threads(2)
data, vit, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
base = json.loads((data / "splits.json").read_text())["spec"]
backbone = load_backbone(vit, device="cpu")
scores = {}
for style, contrast in (("plain", 0.35), ("tint", 0.5), ("tint", 0.65)):
    folder = out / f"{style}-{contrast}"
    if not (folder / "val").is_dir():
        build(folder, SplitSpec(**{**base, "downstream_style": style, "min_contrast": contrast}), only=("val",))
    r = evaluate(backbone, folder / "val", {"NN": None}, EvalConfig(5, 1, 15, 300, seed=99))["results"]["NN"]
    scores[f"{style}, min_contrast {contrast}"] = {"nn": r["mean"], "ci95": r["ci95"]}
    print(style, contrast, r["mean"], r["ci95"], flush=True)
(out / "colour_check.json").write_text(json.dumps(scores, indent=1))

"""Pilot 8: a longer-trained foundation. Pretrains the v2 foundation's recipe for STEPS steps (v2: 1,500; same data,
batch, lr, warm-up + cosine) on /root/repro2's plain pretraining glyphs, then compares it with v2's foundation on the
tinted validation classes: NN, the oracle (meta-training on the zoo's real images, OSTEPS steps, identical config for
both foundations) and the held-out accuracy of the first N zoo LoRAs (200 steps, as in v2).
usage: pilot8.py STEPS OSTEPS N"""
import json, logging, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch
from recycle.backbone import load_backbone
from recycle.formats import read_adapter
from recycle.meta import FolderEpisodes, meta_train
from recycle.pretune import pretune_zoo
from reproduce.pipeline import ReproConfig, _validator, stage_pretrain, val_curve
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
STEPS, OSTEPS, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
R, W = Path("/root/repro2"), Path("/root/p8")
cfg = ReproConfig()
torch.set_num_threads(cfg.threads)
t0 = time.time()
if not (W / "pretrain.json").exists():
    summary = stage_pretrain(replace(cfg, pretrain_steps=STEPS), R / "data", W / "mini-vit")
    (W / "pretrain.json").write_text(json.dumps({**summary, "seconds": round(time.time() - t0)}))
print("PRETRAIN", STEPS, (W / "pretrain.json").read_text(), "v2:", (R / "pretrain.done.json").read_text(), flush=True)
for tag, vit in (("v2", R / "mini-vit"), ("long", W / "mini-vit")):
    bb = load_backbone(str(vit), device="cpu")
    meta = replace(cfg.meta, steps=OSTEPS, val_every=max(1, OSTEPS // 4), checkpoint_every=OSTEPS)
    out = W / f"oracle-{tag}"
    meta_train(bb, FolderEpisodes(R / "data" / "zoo", meta.spec, bb.input_size[1:]), meta, out, resume=True,
               validate=_validator(cfg, bb, R / "data"))
    print("ORACLE", tag, val_curve(out), round(time.time() - t0), flush=True)
    if tag == "v2":
        accs = [read_adapter(R / "zoo" / f"lora_{k:03d}").info["holdout_acc"] for k in range(N)]
    else:
        man = pretune_zoo(bb, R / "data" / "zoo", W / "zoo", replace(cfg.zoo, num_loras=N))
        accs = [e["holdout_acc"] for e in man["loras"]]
    print("ZOO", tag, [round(a, 3) for a in accs], round(sum(accs) / N, 4), round(time.time() - t0), flush=True)

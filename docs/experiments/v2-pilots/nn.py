import sys, torch
sys.path.insert(0, "/work/main")
from recycle.backbone import load_backbone
from recycle.evaluate import EvalConfig, evaluate
torch.set_num_threads(1)
bb = load_backbone("/work/main/weights/mini-vit", device="cpu")
for d in sys.argv[1:]:
    r = evaluate(bb, d, {"NN": None}, EvalConfig(5, 1, 15, 100, seed=123))
    print(d, r["results"]["NN"]["mean"], flush=True)

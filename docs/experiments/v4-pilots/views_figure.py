"""A figure of meta-training's random views: the first row is one surrogate of each of ten classes of a pilot's
first inverted LoRA, each row below one draw of views of them.

    python docs/experiments/v4-pilots/views_figure.py WORK/pool-75 OUT.png '{"stroke": 0.4, "recolour": 0.8}'
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from recycle.pool import Pool, PoolItem  # noqa: E402
from recycle.views import ViewConfig, random_views  # noqa: E402

pool, out, config = Pool(Path(sys.argv[1])), Path(sys.argv[2]), ViewConfig(**json.loads(sys.argv[3]))
n = len(pool.runs[0]["items"])
images = torch.stack([pool.load(PoolItem(0, i)) for i in range(0, n, max(1, n // 10))][:10])
gen = torch.Generator().manual_seed(0)
rows = [images] + [random_views(images, config, gen) for _ in range(4)]
grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
picture.resize((picture.width * 4, picture.height * 4), Image.NEAREST).save(out)

"""Pre-tune → invert → meta-train → eval through the CLI on a tiny backbone, plus the pieces they rely on."""

import json

import numpy as np
import pytest
import torch

from recycle.cli import main
from recycle.adapter import average_loras
from recycle.backbone import load_backbone
from recycle.evaluate import EvalConfig, evaluate, mean_ci
from recycle.formats import read_adapter
from recycle.lora import remove_lora
from recycle.runtime import native_bf16
from tests.helpers import colour_task


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """ImageFolder splits: 6 zoo classes, 3 validation classes, 3 test classes (distinct colours and patterns)."""
    root = tmp_path_factory.mktemp("data")
    images, labels = colour_task(n_classes=6, per_class=10, seed=0)
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / "zoo" / f"colour{y}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i}.png")
    g = torch.Generator().manual_seed(1)
    from PIL import Image

    for split, n in (("val", 3), ("test", 3)):
        for c in range(n):
            d = root / split / f"{split}{c}"
            d.mkdir(parents=True)
            base = (torch.rand(3, generator=g) * 255).int().tolist()
            for i in range(8):
                noise = (torch.rand(32, 32, 3, generator=g) * 80).to(torch.uint8).numpy()
                arr = np.clip(np.array(base, dtype=np.int16) + noise - 40, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_ci_formula():
    mean, ci = mean_ci([0.5, 0.7, 0.6, 0.8])
    assert mean == pytest.approx(0.65)
    assert ci == pytest.approx(1.96 * np.std([0.5, 0.7, 0.6, 0.8]) / 2)


def test_lora_average_is_the_mean_of_the_updates(tiny_clip, tmp_path):
    from tests.helpers import train_tiny_lora

    images, labels = colour_task()
    adapters = [train_tiny_lora(tiny_clip, images, labels, steps=3, seed=s) for s in range(3)]
    deltas = []
    for a in adapters:
        a.inject(tiny_clip.model)
        deltas.append(tiny_clip.model.blocks[1].attn.qkv.delta_weight().detach())
        remove_lora(tiny_clip.model)
    avg = average_loras(adapters)
    assert avg.config.rank == 12 and avg.head_weight is None
    avg.inject(tiny_clip.model)
    assert torch.allclose(tiny_clip.model.blocks[1].attn.qkv.delta_weight(), torch.stack(deltas).mean(0), atol=1e-6)


def test_end_to_end_cli(dataset, tiny_clip_dir, local_hub, tmp_path, capsys):
    backbone = ["--backbone", str(tiny_clip_dir), "--device", "cpu"]
    zoo, pool, run = tmp_path / "zoo", tmp_path / "pool", tmp_path / "meta"

    # 1. pre-tune a zoo of three 3-way LoRAs; a re-run skips finished LoRAs
    args = [
        "pretune",
        *backbone,
        "--data",
        str(dataset / "zoo"),
        "--out",
        str(zoo),
        "--num-loras",
        "3",
        "--way",
        "3",
        "--steps",
        "30",
        "--lr",
        "1e-2",
        "--quiet",
    ]
    assert main(args) == 0
    manifest = json.loads((zoo / "zoo.json").read_text())
    assert [e["name"] for e in manifest["loras"]] == ["lora_000", "lora_001", "lora_002"]
    assert np.mean([e["holdout_acc"] for e in manifest["loras"]]) >= 0.6
    stamp = (zoo / "lora_001" / "adapter_model.safetensors").stat().st_mtime_ns
    (zoo / "lora_002" / "adapter_model.safetensors").unlink()  # as if killed while tuning the last one
    assert main(args) == 0
    assert (zoo / "lora_001" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert (zoo / "lora_002" / "adapter_model.safetensors").is_file()
    assert read_adapter(zoo / "lora_000").class_names == manifest["loras"][0]["classes"]

    # 2. invert every LoRA into one pool, with pruning (masked copies)
    for k in range(3):
        assert (
            main(
                [
                    "invert",
                    *backbone,
                    "--lora",
                    str(zoo / f"lora_{k:03d}"),
                    "--out",
                    str(pool),
                    "--per-class",
                    "4",
                    "--steps",
                    "30",
                    "--lr",
                    "0.1",
                    "--prune",
                    "1:0.5",
                    "--bn-prior",
                    "none",
                    "--seed",
                    str(k),
                    "--quiet",
                ]
            )
            == 0
        )

    # 3. meta-train on kept tokens, with validation on a real split; resume continues
    meta = [
        "meta-train",
        *backbone,
        "--pool",
        str(pool),
        "--out",
        str(run),
        "--way",
        "3",
        "--shot",
        "1",
        "--query",
        "3",
        "--masked",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "5",
        "--val",
        str(dataset / "val"),
        "--val-every",
        "10",
        "--val-episodes",
        "5",
        "--quiet",
    ]
    assert main(meta + ["--steps", "10"]) == 0
    assert main(meta + ["--steps", "20", "--resume"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(0, 21)) and "val_acc" in log[0] and "val_acc" in log[-1]
    info = read_adapter(run / "meta-lora").info
    assert info["meta_training"]["bf16"] is native_bf16("cpu")  # --precision auto: bf16 where the CPU has it
    card = (run / "meta-lora" / "README.md").read_text()
    assert "without any real training data" in card and "meta-train" in card

    # 4. evaluate against the baselines on the held-out test classes
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                *backbone,
                "--data",
                str(dataset / "test"),
                "--zoo",
                str(zoo),
                "--lora",
                f"recycle={run / 'meta-lora'}",
                "--way",
                "3",
                "--shot",
                "1",
                "--query",
                "3",
                "--episodes",
                "20",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["NN", "LoRAs-average + NN", "recycle"]
    # the command's numbers are the library's, on the same seeded episodes
    tiny = load_backbone(str(tiny_clip_dir), device="cpu")
    direct = evaluate(
        tiny,
        dataset / "test",
        {"NN": None, "recycle": read_adapter(run / "meta-lora")},
        EvalConfig(3, 1, 3, 20, seed=0),
    )["results"]
    for name in ("NN", "recycle"):
        assert report["results"][name]["mean"] == pytest.approx(direct[name]["mean"], abs=1e-6), name
        assert report["results"][name]["episodes"] == 20
    assert "| recycle |" in capsys.readouterr().out

    # 5. publish the meta-LoRA to the (local) Hub and use it from there
    assert main(["push", "--dir", str(run / "meta-lora"), "--repo", "me/meta-lora", "--token", "test"]) == 0
    assert (local_hub.root / "me" / "meta-lora" / "adapter_model.safetensors").read_bytes() == (
        run / "meta-lora" / "adapter_model.safetensors"
    ).read_bytes()
    assert (
        main(
            [
                "eval",
                *backbone,
                "--data",
                str(dataset / "test"),
                "--lora",
                "me/meta-lora",
                "--way",
                "3",
                "--shot",
                "1",
                "--query",
                "3",
                "--episodes",
                "20",
                "--json",
                str(tmp_path / "hub.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "hub.json").read_text())["results"]["me/meta-lora"] == report["results"]["recycle"]
    local_hub.stop()
    assert main(["push", "--dir", str(run / "meta-lora"), "--repo", "me/meta-lora", "--token", "test"]) == 1
    assert "cannot reach" in capsys.readouterr().err

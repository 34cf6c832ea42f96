"""Runs under torchrun (2 CPU processes, gloo) against one process: same zoo, same pool, same meta-LoRA, same report;
a killed run resumes exactly; a failing or hanging rank ends the command with a clear message instead of a hang."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recycle import distributed
from recycle.cli import main
from recycle.formats import read_adapter
from safetensors.torch import load_file
from tests.helpers import make_image
from tests.support.hubserver import free_port
from tests.test_pipeline import dataset  # noqa: F401 - the ImageFolder splits, shared

REPO = Path(__file__).resolve().parents[1]
META_STEPS = 6


def torchrun(
    commands: list[list[str]], fault: str = "", timeout_s: str = "60", limit: float = 300
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` of `tests.dist_worker` running `commands`; one thread per process."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "RECYCLE_TEST_FAULT": fault,
        "RECYCLE_DIST_TIMEOUT": timeout_s,
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "tests.dist_worker",
        json.dumps(commands),
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value after `flag` replaced."""
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def _pool_files(pool: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file in a pool; manifests without their time stamp."""
    out = {}
    for f in sorted(pool.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.name == "manifest.json":
                manifest = json.loads(data)
                manifest.pop("created")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(f.relative_to(pool))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(dataset, tiny_clip_dir, tmp_path_factory):  # noqa: F811
    """Every sharded command once in one process and once on 2 ranks (the ranks use the serial zoo and pool as
    inputs, so each stage is compared on its own)."""
    root = tmp_path_factory.mktemp("dist")
    for c in range(4):  # classes of pure noise: accuracies vary from episode to episode, so the means are telling
        (root / "noise" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            make_image(100 * c + i, size=32).save(root / "noise" / f"c{c}" / f"{i}.png")
    backbone = ["--backbone", str(tiny_clip_dir), "--device", "cpu"]
    s, d = root / "serial", root / "ranks"

    def commands(out: Path) -> list[list[str]]:
        return [
            [
                "pretune",
                *backbone,
                "--data",
                str(dataset / "zoo"),
                "--out",
                str(out / "zoo"),
                "--num-loras",
                "3",
                "--way",
                "3",
                "--steps",
                "8",
                "--lr",
                "1e-2",
                "--quiet",
            ],
            [
                "invert",
                *backbone,
                "--zoo",
                str(s / "zoo"),
                "--out",
                str(out / "pool"),
                "--per-class",
                "4",
                "--steps",
                "6",
                "--lr",
                "0.1",
                "--prune",
                "1:0.5",
                "--bn-prior",
                "none",
                "--quiet",
            ],
            [
                "meta-train",
                *backbone,
                "--pool",
                str(s / "pool"),
                "--out",
                str(out / "meta"),
                "--steps",
                str(META_STEPS),
                "--way",
                "3",
                "--shot",
                "1",
                "--query",
                "2",
                "--masked",
                "--lr",
                "1e-2",
                "--episode-batch",
                "2",
                "--checkpoint-every",
                "2",
                "--val",
                str(root / "noise"),
                "--val-every",
                "3",
                "--val-episodes",
                "5",
                "--quiet",
            ],
            [
                "eval",
                *backbone,
                "--data",
                str(root / "noise"),
                "--zoo",
                str(s / "zoo"),
                "--lora",
                f"meta={s / 'meta' / 'meta-lora'}",
                "--way",
                "3",
                "--shot",
                "1",
                "--query",
                "2",
                "--episodes",
                "13",
                "--json",
                str(out / "eval.json"),
            ],
        ]

    for args in commands(s):
        assert main(args) == 0
    done = torchrun(commands(d))
    assert done.returncode == 0, done.stdout + done.stderr
    return {"serial": s, "ranks": d, "commands": commands, "stderr": done.stderr}


def test_pretune_shards_the_zoo(runs):
    s, d = runs["serial"] / "zoo", runs["ranks"] / "zoo"
    names = [e["name"] for e in json.loads((s / "zoo.json").read_text())["loras"]]
    assert (
        [e["name"] for e in json.loads((d / "zoo.json").read_text())["loras"]]
        == names
        == ["lora_000", "lora_001", "lora_002"]
    )
    for name in names:
        a, b = read_adapter(s / name), read_adapter(d / name)
        assert a.class_names == b.class_names
        for key, value in a.state.items():
            assert torch.equal(b.state[key], value), (name, key)


def test_sharded_zoo_inversion_writes_the_serial_pool(runs):
    serial = _pool_files(runs["serial"] / "pool")
    assert len([k for k in serial if k.endswith("manifest.json")]) == 3
    assert _pool_files(runs["ranks"] / "pool") == serial


def test_two_ranks_with_one_episode_each_equal_one_process_with_two(runs):
    # The last step's meta-LoRA (the checkpoint), not the exported one, which validation may choose at step 0.
    a, b = (load_file(str(runs[k] / "meta" / "checkpoint.safetensors")) for k in ("serial", "ranks"))
    lora = [k for k in a if k.startswith("lora.")]
    assert any(a[k].abs().max() > 1e-3 for k in lora if "lora_B" in k)  # it trained (B starts at 0)
    for key in lora:
        assert torch.allclose(b[key], a[key], atol=1e-6, rtol=0), key
    best = [read_adapter(runs[k] / "meta" / "meta-lora").info["best_step"] for k in ("serial", "ranks")]
    assert best[0] == best[1]  # the exported meta-LoRA is the same validated best on both
    log = [json.loads(line) for line in (runs["ranks"] / "meta" / "log.jsonl").read_text().splitlines()]
    serial_log = [json.loads(line) for line in (runs["serial"] / "meta" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(0, META_STEPS + 1))  # step 0: the bare backbone's validation
    steps = [r for r in log if "loss" in r]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in serial_log if "loss" in r], abs=1e-5)
    assert all(r["episodes"] == 2 for r in steps)
    vals = [r["val_acc"] for r in log if "val_acc" in r]  # validation split over the ranks, gathered
    assert len(vals) == 3 and vals == [r["val_acc"] for r in serial_log if "val_acc" in r]


def test_sharded_eval_reports_the_serial_results(runs):
    serial = json.loads((runs["serial"] / "eval.json").read_text())
    assert set(serial["results"]) == {"NN", "LoRAs-average + NN", "meta"}
    assert all(0 < r["ci95"] for r in serial["results"].values())
    assert json.loads((runs["ranks"] / "eval.json").read_text())["results"] == serial["results"]


def test_a_killed_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    meta = runs["commands"](tmp_path)[2]
    killed = torchrun([meta], fault="kill:1:3")  # rank 1 is SIGKILLed at its 4th step; torchrun stops rank 0
    assert killed.returncode != 0
    assert not (tmp_path / "meta" / "meta-lora").exists()
    resumed = torchrun([meta + ["--resume"]])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for name in ("meta-lora/adapter_model.safetensors", "checkpoint.safetensors"):  # the export and the last step
        a, b = (load_file(str(root / "meta" / name)) for root in (runs["ranks"], tmp_path))
        assert a.keys() == b.keys() and all(torch.equal(b[k], a[k]) for k in a if not k.startswith("rng.")), name
    log = [json.loads(line) for line in (tmp_path / "meta" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(0, META_STEPS + 1))


def test_a_failing_rank_ends_the_command_with_its_error(runs, tmp_path):
    meta = runs["commands"](tmp_path)[2]
    t0 = time.monotonic()
    done = torchrun([meta], fault="raise:1:1")
    assert done.returncode != 0 and time.monotonic() - t0 < 120
    assert "rank 1 of 2 failed: RuntimeError: injected failure at step 1" in done.stderr


def test_a_hanging_rank_times_out_instead_of_hanging(runs, tmp_path):
    meta = runs["commands"](tmp_path)[2]
    t0 = time.monotonic()
    done = torchrun([meta], fault="hang:1:1", timeout_s="4")
    assert done.returncode != 0 and time.monotonic() - t0 < 120
    assert "rank 0 of 2: gathering results failed" in done.stderr
    assert "RECYCLE_DIST_TIMEOUT" in done.stderr


def test_episode_batch_must_split_evenly_over_the_ranks(runs, tmp_path):
    meta = runs["commands"](tmp_path)[2]
    done = torchrun([_with(meta, "--episode-batch", "3")])
    assert done.returncode != 0
    assert "episode_batch=3 cannot be split evenly over 2 ranks" in done.stderr


def test_a_resumed_zoo_inversion_skips_finished_runs(runs, tmp_path, capsys):
    pool = tmp_path / "pool"
    shutil.copytree(runs["serial"] / "pool", pool)
    runs_dirs = sorted(p for p in pool.iterdir() if p.is_dir())
    kept = runs_dirs[0] / "manifest.json"
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(runs_dirs[1])  # as if killed before this LoRA's run was renamed into place
    args = runs["commands"](tmp_path)[1]
    assert main(args) == 0
    assert "inverted 1 LoRAs, 2 already done" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == stamp
    assert _pool_files(pool) == _pool_files(runs["serial"] / "pool")
    assert main(_with(args, "--steps", "7")) == 1  # a user error
    assert "was inverted with other settings (steps differ)" in capsys.readouterr().err


def test_one_process_helpers_are_the_identity():
    assert not distributed.launched() or distributed.world_size() == 1
    assert list(distributed.shard_indices(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather_ordered(["a", "b"], 2) == ["a", "b"]
    t = torch.ones(3)
    distributed.all_reduce_sum_([t])
    assert torch.equal(t, torch.ones(3))
    assert distributed.derive_seed(0, 1, 2) == distributed.derive_seed(0, 1, 2) != distributed.derive_seed(0, 2, 1)
    assert distributed.setup("auto") == "auto"  # no torchrun: nothing to join, the device is left as given

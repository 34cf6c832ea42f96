import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from recycle.cli import main
from recycle.formats import LoRAAdapter, save_adapter
from recycle.lora import LoRAConfig, inject_lora, lora_parameters, remove_lora
from recycle.runtime import int8_supported
from tests.helpers import make_image


def _noisy(rgb, seed):
    return Image.blend(Image.new("RGB", (48, 48), rgb), make_image(seed, 48), 0.15)


@pytest.fixture()
def task(tmp_path):
    """support/<class>/*.png with distinct colours, and queries that are noisy copies (one in a subfolder)."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    for name, rgb in colours.items():
        d = tmp_path / "support" / name
        d.mkdir(parents=True)
        for i in range(2):
            _noisy(rgb, 10 + i).save(d / f"{i}.png")
    q = tmp_path / "query"
    (q / "sub").mkdir(parents=True)
    _noisy(colours["green"], 50).save(q / "g.png")
    _noisy(colours["blue"], 51).save(q / "sub" / "b.jpg")
    return tmp_path


def test_help_lists_only_working_commands():
    out = subprocess.run([sys.executable, "-m", "recycle", "--help"], capture_output=True, text=True, check=True)
    assert "predict" in out.stdout and "invert" in out.stdout


def test_predict_prints_table_and_writes_json(task, tiny_clip_dir, capsys):
    out = task / "preds.json"
    code = main(
        [
            "predict",
            "--backbone",
            str(tiny_clip_dir),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "query"),
            "--json",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "g.png" in table and "sub/b.jpg" in table
    preds = json.loads(out.read_text())
    assert [p["file"] for p in preds] == ["g.png", "sub/b.jpg"]
    for p in preds:
        assert set(p["probs"]) == {"blue", "green", "red"}
        assert sum(p["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probs"], key=p["probs"].get)
    if int8_supported():  # the same task in int8: the same answers
        args = ["predict", "--backbone", str(tiny_clip_dir), "--support", str(task / "support")]
        assert main([*args, "--query", str(task / "query"), "--json", str(out), "--precision", "int8"]) == 0
        assert [p["label"] for p in json.loads(out.read_text())] == [p["label"] for p in preds]


def _publish_lora(tiny_clip, repo_dir):
    inject_lora(tiny_clip.model, LoRAConfig())
    with torch.no_grad():
        for p in lora_parameters(tiny_clip.model):
            p.normal_(0, 0.2)
    adapter = LoRAAdapter.from_model(tiny_clip.model, LoRAConfig(), backbone=tiny_clip.name)
    remove_lora(tiny_clip.model)
    save_adapter(adapter, repo_dir)


def test_predict_with_lora_from_the_hub(task, tiny_clip, tiny_clip_dir, local_hub, capsys):
    _publish_lora(tiny_clip, local_hub.root / "someone" / "meta-lora")
    args = [
        "predict",
        "--backbone",
        str(tiny_clip_dir),
        "--support",
        str(task / "support"),
        "--query",
        str(task / "query"),
        "--device",
        "cpu",
    ]
    assert main(args + ["--lora", "someone/meta-lora", "--json", str(task / "a.json")]) == 0
    assert main(args + ["--json", str(task / "b.json")]) == 0
    with_lora = json.loads((task / "a.json").read_text())
    without = json.loads((task / "b.json").read_text())
    assert with_lora[0]["probs"] != without[0]["probs"]  # the downloaded LoRA was applied


def test_hub_errors_are_short_and_clear(task, tiny_clip_dir, local_hub, capsys):
    (local_hub.root / "someone" / "pickled").mkdir(parents=True)
    (local_hub.root / "someone" / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    base = [
        "predict",
        "--backbone",
        str(tiny_clip_dir),
        "--support",
        str(task / "support"),
        "--query",
        str(task / "query"),
        "--device",
        "cpu",
    ]
    cases = {
        "someone/pickled": "never downloaded or loaded",
        "someone/missing": "does not exist",
        "../etc/passwd": "neither an existing local path nor a Hub id",
    }
    for lora, message in cases.items():
        assert main(base + ["--lora", lora]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    local_hub.stop()
    assert main(base + ["--lora", "someone/other"]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_bad_support_folder(task, tiny_clip_dir, capsys):
    (task / "support" / "green").rename(task / "only")
    (task / "support" / "blue").rename(task / "only2")
    code = main(
        [
            "predict",
            "--backbone",
            str(tiny_clip_dir),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "query"),
            "--device",
            "cpu",
        ]
    )
    assert code == 1 and "at least 2 classes" in capsys.readouterr().err


def _publish_tiny_resnet(repo_dir):
    """A tiny BatchNorm CNN in timm's Hub layout, standing in for the ImageNet ResNet-50 prior."""
    import timm
    from timm.models import save_for_hf

    args = dict(layers=[1, 1, 1, 1], num_classes=10)
    model = timm.create_model("resnet18", pretrained=False, **args)
    save_for_hf(model, str(repo_dir), safe_serialization=True, model_args=args)


def test_invert_from_the_hub_into_a_pool(tiny_clip, tiny_clip_dir, local_hub, tmp_path, capsys):
    from recycle.pool import Pool
    from tests.helpers import colour_task, train_tiny_lora

    adapter = train_tiny_lora(tiny_clip, *colour_task())
    save_adapter(adapter, local_hub.root / "someone" / "colours-lora")
    _publish_tiny_resnet(local_hub.root / "testorg" / "tiny-resnet")
    out = tmp_path / "pool"
    args = [
        "invert",
        "--backbone",
        str(tiny_clip_dir),
        "--lora",
        "someone/colours-lora",
        "--out",
        str(out),
        "--per-class",
        "3",
        "--steps",
        "40",
        "--lr",
        "0.1",
        "--prune",
        "1:0.5",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(args + ["--bn-prior", "hf-hub:testorg/tiny-resnet", "--classes", "c0", "c2"]) == 0
    assert "teacher accuracy" in capsys.readouterr().out
    pool = Pool(out)
    assert [c.name for c in pool.classes] == ["c0", "c2"] and pool.masked_available
    run = pool.runs[0]
    assert run["settings"]["pruning"]["schedule"] == {"1": 0.5} and run["settings"]["steps"] == 40
    assert all(len(item["kept"]) == 8 for item in run["items"])
    assert main(args + ["--bn-prior", "none", "--seed", "1", "--two-colour", "0.4", "--diversity-weight", "2"]) == 0
    runs = Pool(out).runs  # the pool grows, and the new run records the options
    assert len(runs) == 2 and {(r["settings"]["two_colour"], r["settings"]["diversity_weight"]) for r in runs} == {
        (None, 0.0),
        (0.4, 2.0),
    }
    assert main(args + ["--bn-prior", "hf-hub:testorg/missing-prior"]) == 1
    assert "not found" in capsys.readouterr().err and len(Pool(out).runs) == 2
    assert main([a if a != "40" else "0" for a in args] + ["--bn-prior", "none"]) == 1
    assert "steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- hostile input
@pytest.fixture()
def zoo_lora(tiny_clip, tmp_path):
    """A LoRA with a head, and one without (like a meta-LoRA), in PEFT layout."""
    from tests.helpers import colour_task, train_tiny_lora

    save_adapter(train_tiny_lora(tiny_clip, *colour_task(per_class=2), steps=2), tmp_path / "with-head")
    _publish_lora(tiny_clip, tmp_path / "headless")
    return tmp_path


def _user_error(capsys, code, message):
    """The command failed as a user error: exit code 1 (not argparse's 2), one line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]


def _invert_args(tiny_clip_dir, lora, out, *extra):
    return [
        "invert",
        "--backbone",
        str(tiny_clip_dir),
        "--lora",
        str(lora),
        "--out",
        str(out),
        "--per-class",
        "1",
        "--steps",
        "1",
        "--bn-prior",
        "none",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def test_user_errors_print_one_line_and_exit_with_1(zoo_lora, tiny_clip_dir, tmp_path, capsys):
    _user_error(
        capsys, main(_invert_args(tiny_clip_dir, zoo_lora / "headless", tmp_path / "pool")), r"no classification head"
    )
    (tmp_path / "a-file").write_text("not a folder")
    _user_error(
        capsys,
        main(_invert_args(tiny_clip_dir, zoo_lora / "with-head", tmp_path / "a-file")),
        r"pool folder '.*a-file' is a file, not a folder",
    )
    config = json.loads((zoo_lora / "with-head" / "adapter_config.json").read_text())
    (zoo_lora / "with-head" / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"(a+)+$": 2}}))
    _user_error(
        capsys,
        main(_invert_args(tiny_clip_dir, zoo_lora / "with-head", tmp_path / "pool")),
        r"rank_pattern key '\(a\+\)\+\$' is not supported",
    )
    _user_error(
        capsys,
        main(
            [
                "predict",
                "--backbone",
                str(tiny_clip_dir),
                "--support",
                str(tmp_path),
                "--query",
                str(tmp_path),
                "--device",
                "bogus",
            ]
        ),
        r"'bogus' is not a device",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_user_error(task, tiny_clip_dir, capsys):
    code = main(
        [
            "predict",
            "--backbone",
            str(tiny_clip_dir),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "query"),
            "--device",
            "cuda",
        ]
    )
    _user_error(capsys, code, r"device 'cuda' was requested, but no CUDA GPU is available here")


def test_meta_train_on_a_pool_with_non_finite_values_is_a_user_error(zoo_lora, tiny_clip_dir, tmp_path, capsys):
    assert main(_invert_args(tiny_clip_dir, zoo_lora / "with-head", tmp_path / "pool")) == 0
    manifest = next((tmp_path / "pool").glob("*/manifest.json"))
    data = json.loads(manifest.read_text())
    data["items"][0]["logits"][0] = "NaN-PLACEHOLDER"
    manifest.write_text(json.dumps(data).replace('"NaN-PLACEHOLDER"', "NaN"))
    code = main(
        [
            "meta-train",
            "--backbone",
            str(tiny_clip_dir),
            "--pool",
            str(tmp_path / "pool"),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    _user_error(capsys, code, r"unreadable manifest .*NaN is not a JSON number")


def test_negative_pruning_layers_need_no_equals_sign():
    from recycle.cli import build_parser

    args = build_parser().parse_args(["invert", "--lora", "x", "--out", "y", "--prune", "-1:0.75", "-2,-1:0.5"])
    assert args.prune == ["-1:0.75", "-2,-1:0.5"]
    with pytest.raises(SystemExit) as exit_:  # a malformed command line is argparse's usage error, exit code 2
        build_parser().parse_args(["invert", "--lora", "x"])
    assert exit_.value.code == 2


def test_precision_flags_and_allocator_tuning_for_heavy_commands(monkeypatch, tmp_path, capsys):
    """--bf16 is short for --precision bf16 and auto is the default; the heavy commands tune the allocator before
    they start (even when they then fail on bad input), light ones do not."""
    from recycle import cli

    parser = cli.build_parser()
    for command in ("predict", "invert", "meta-train", "eval"):
        required = {
            "predict": ["--support", "s", "--query", "q"],
            "invert": ["--lora", "l", "--out", "o"],
            "meta-train": ["--pool", "p", "--out", "o", "--steps", "1"],
            "eval": ["--data", "d"],
        }[command]
        assert parser.parse_args([command, *required]).precision == "auto"
        assert parser.parse_args([command, *required, "--bf16"]).precision == "bf16"
        assert parser.parse_args([command, *required, "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--data", "d", "--precision", "fp16"])
    for command in ("predict", "eval"):  # int8 is for the commands that only embed images
        required = ["--support", "s", "--query", "q"] if command == "predict" else ["--data", "d"]
        assert parser.parse_args([command, *required, "--precision", "int8"]).precision == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["meta-train", "--pool", "p", "--out", "o", "--steps", "1", "--precision", "int8"])
    capsys.readouterr()
    assert "precision" not in parser.parse_args(["pretune", "--data", "d", "--out", "o", "--num-loras", "1"])
    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1) or {})
    assert main(["eval", "--data", str(tmp_path / "missing")]) == 1 and len(calls) == 1
    assert main(["predict", "--support", str(tmp_path / "missing"), "--query", str(tmp_path)]) == 1
    assert len(calls) == 2
    assert main(["push", "--dir", str(tmp_path / "missing"), "--repo", "me/x"]) == 1 and len(calls) == 2  # light
    capsys.readouterr()


# ------------------------------------------------------------------------- hostile backbones, devices, terminal names
def test_hostile_backbone_folder_and_devices_are_one_line_user_errors(task, tiny_clip_dir, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_clip_dir, tmp_path / "deep")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["depth"] = "4"
    (folder / "config.json").write_text(json.dumps(config))
    args = ["predict", "--support", str(task / "support"), "--query", str(task / "query")]
    assert main(args + ["--backbone", str(folder), "--device", "cpu"]) == 1
    _user_error(capsys, 1, r"config\.json: 'depth' must be an integer, not '4'")
    for device in ("meta", "xpu"):
        assert main(args + ["--backbone", str(tiny_clip_dir), "--device", device]) == 1
        _user_error(capsys, 1, rf"device '{device}'")


def test_nan_weights_never_give_predictions(task, tiny_clip_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_clip_dir, tmp_path / "nan")
    tensors = load_file(folder / "model.safetensors")
    tensors["norm.weight"][:] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    code = main(
        [
            "predict",
            "--backbone",
            str(folder),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "query"),
            "--device",
            "cpu",
        ]
    )
    _user_error(capsys, code, r"non-finite embeddings")


def test_query_names_with_terminal_escapes_are_printed_escaped(task, tiny_clip_dir, capsys):
    shutil_src = task / "query" / "g.png"
    (task / "query" / "evil\r\x1b[31mred.png").write_bytes(shutil_src.read_bytes())
    code = main(
        [
            "predict",
            "--backbone",
            str(tiny_clip_dir),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "query"),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "\x1b" not in out and "\r" not in out
    assert "evil\\r\\x1b[31mred.png" in out


@pytest.mark.parametrize(
    "argv, option",
    [
        (["meta-train", "--pool", "p", "--out", "o", "--steps", "1", "--lr", "1e300"], "--lr"),
        (
            ["meta-train", "--pool", "p", "--out", "o", "--steps", "1", "--teacher-temperature", "inf"],
            "--teacher-temperature",
        ),
        (["meta-train", "--pool", "p", "--out", "o", "--steps", "1", "--cross-fraction", "nan"], "--cross-fraction"),
        (["meta-train", "--zoo", "z", "--out", "o", "--steps", "1", "--mask-ratio", "1"], "--mask-ratio"),
        (["invert", "--lora", "l", "--out", "o", "--bn-weight", "inf"], "--bn-weight"),
        (["invert", "--lora", "l", "--out", "o", "--bn-weight", "1e308"], "--bn-weight"),
        (["invert", "--lora", "l", "--out", "o", "--lr", "inf"], "--lr"),
        (["invert", "--lora", "l", "--out", "o", "--prune-start", "-0.5"], "--prune-start"),
        (["pretune", "--data", "d", "--out", "o", "--num-loras", "1", "--lr", "nan"], "--lr"),
        (["pretune", "--data", "d", "--out", "o", "--num-loras", "1", "--shift", "1e9"], "--shift"),
    ],
)
def test_float_options_are_checked_before_any_work(argv, option, capsys, monkeypatch):
    import recycle.backbone

    monkeypatch.setattr(recycle.backbone, "load_backbone", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {option}: " in err and "out of range" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["junk", "off", "1"])
def test_unknown_allocator_settings_are_refused(value, monkeypatch, task, tiny_clip_dir, capsys):
    import recycle.runtime

    monkeypatch.setattr(recycle.runtime, "_allocator_settings", None)
    monkeypatch.setenv("RECYCLE_MALLOC", value)
    code = main(
        [
            "predict",
            "--backbone",
            str(tiny_clip_dir),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "query"),
            "--device",
            "cpu",
        ]
    )
    _user_error(capsys, code, rf"RECYCLE_MALLOC='{value}' is not a setting: use 'tuned'.*or 'default'")
    assert recycle.runtime.allocator_settings() == {}


@pytest.mark.parametrize("value", ["inf", "1e20", "nan", "-5", "abc"])
def test_the_distributed_timeout_must_be_a_sane_number_of_seconds(value, monkeypatch):
    from recycle import distributed

    monkeypatch.setenv("RECYCLE_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"RECYCLE_DIST_TIMEOUT='{value}'"):
        distributed.timeout()
    monkeypatch.setenv("RECYCLE_DIST_TIMEOUT", "604800")
    assert distributed.timeout().total_seconds() == 604800


def test_error_messages_are_printed_without_terminal_escapes(task, tiny_clip_dir, capsys):
    code = main(
        [
            "predict",
            "--backbone",
            str(tiny_clip_dir),
            "--support",
            str(task / "support"),
            "--query",
            str(task / "evil\x1b[2J"),
            "--device",
            "cpu",
        ]
    )  # a missing folder whose name clears the screen
    err = capsys.readouterr().err
    assert code == 1 and "\x1b" not in err and "evil\\x1b[2J" in err, err

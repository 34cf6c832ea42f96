"""The app's warm few-shot request on CPU in fp32, bf16 and int8, interleaved: speed, predictions, profile, and the
app's own latency through `gradio_client`.

Backbone: timm ``vit_base_patch16_clip_224.openai`` with RANDOM weights (nothing can be downloaded here) and a rank-4
q/v meta-LoRA with random B. The request is the few-shot tab's: a 5-way 5-shot support set embedded before (cached),
10 fresh queries, answered with the meta-LoRA and with the backbone alone (the tab shows both), i.e. ``fit`` +
``predict_proba`` on two `FewShotClassifier`s. Variants, interleaved within every repeat (order rotated):

- ``fp32``; ``bf16``: `recycle.runtime.mixed_precision` autocast;
- ``int8``: `recycle.quantize` (the LoRA baked in, every Linear dynamically quantised with per-channel weights by
  `torch.ao.quantization`), the copies made before timing, as the app makes them once per backbone and LoRA;
- ``int8-torchao``: the same copies quantised by torchao's ``Int8DynamicActivationInt8WeightConfig`` instead, when
  torchao is installed (a candidate, not used by the library).

Predictions: every variant against fp32 on 5-way x 40 held-out queries with the meta-LoRA (not timed). Profile: one
10-query forward per variant under `torch.profiler`, self time per op group. Then what ``auto`` chooses on this
backbone (`recycle.quantize.choose_precision`).

Each ISA runs in a fresh process: ``native`` (this CPU as it is) and ``avx2``, an AVX2-only CPU without native bf16
emulated by capping oneDNN, MKL and ATen at AVX2 (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``,
``ATEN_CPU_CAPABILITY``) with torch's quantized engine on oneDNN (fbgemm cannot be capped). The arithmetic units are
still this machine's, so the emulation shows the instruction sets' effect, not a slower machine's.

End to end: the app in this process (``RECYCLE_PRECISION`` fp32, int8 and auto, the backbone and meta-LoRA saved as
local folders), the same request through `gradio_client`: cold (the first, which loads, calibrates and quantises) and
warm (the next ones, fresh queries).

    python -m benchmarks.bench_int8 [--quick] [--repeats N] [--isa native avx2] [--no-app] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import timm
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_fewshot import MODEL_NAME, Task, make_adapter, make_task
from benchmarks.common import (
    REPO,
    Summary,
    contention_of,
    environment,
    markdown_table,
    report_header,
    rotated,
    run_worker,
    timed,
    write_results,
)
from recycle.backbone import Backbone
from recycle.fewshot import FewShotClassifier
from recycle.formats import LoRAAdapter
from recycle.runtime import int8_supported, native_bf16, tune_allocator

DEFAULT_OUT = REPO / "benchmarks" / "results" / "fewshot-int8.md"
SPEED_TARGET = 1.8  # fp32 / int8 CPU time of the warm request, on a CPU without native bf16
AGREEMENT_TARGET = 0.98
ISA_ENV = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
OP_GROUPS = {
    "fp32 linear": ("aten::addmm", "aten::mm", "aten::linear"),
    "int8 linear (incl. activation quantisation)": (
        "quantized::linear_dynamic",
        "torchao",
        "aten::_int_mm",
        "aten::_weight_int8pack_mm",
    ),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::baddbmm", "aten::_softmax"),
    "GELU, LayerNorm": ("aten::gelu", "aten::native_layer_norm"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
}


def _torchao_available() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def torchao_model(backbone: Backbone, lora: Optional[LoRAAdapter]) -> torch.nn.Module:
    """A private copy of the backbone's model with `lora` baked in, quantised by torchao (the candidate)."""
    import copy

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from recycle.lora import bake_lora

    with lora.attached(backbone, merged=True) if lora is not None else backbone.lock:
        private = copy.deepcopy(backbone.model)
    bake_lora(private)
    quantize_(private, Int8DynamicActivationInt8WeightConfig())
    return private.eval()


class TorchaoClassifier(FewShotClassifier):
    """A `FewShotClassifier` whose forward runs a torchao copy (benchmark only)."""

    def __init__(self, backbone: Backbone, lora: Optional[LoRAAdapter], model: torch.nn.Module):
        super().__init__(backbone, lora)
        self._lora_key += "/torchao"
        self._model = model

    @torch.inference_mode()
    def _forward(self, images):
        return torch.cat(
            [
                self.backbone.embed(self.backbone.preprocess(images[i : i + self.batch_size]), model=self._model)
                for i in range(0, len(images), self.batch_size)
            ]
        ).float()


def classifiers(backbone: Backbone, lora: LoRAAdapter, variant: str) -> tuple[FewShotClassifier, FewShotClassifier]:
    """The meta-LoRA's and the bare backbone's classifiers of `variant` (int8 copies made here, before timing)."""
    if variant == "int8-torchao":
        return tuple(TorchaoClassifier(backbone, a, torchao_model(backbone, a)) for a in (lora, None))
    made = tuple(FewShotClassifier(backbone, a, bf16=variant == "bf16", int8=variant == "int8") for a in (lora, None))
    for clf in made:
        clf.embed([Image.new("RGB", (224, 224))])  # int8: makes the copy now, as the app's first request does
        clf.clear_cache()
    return made


def request(pair: tuple[FewShotClassifier, FewShotClassifier], task: Task, queries: list[Image.Image]) -> list:
    """The tab's request: fit the (cached) support and predict the queries, with the meta-LoRA and without."""
    out = []
    for clf in pair:
        clf.fit(task.support, task.support_labels)
        out.append(clf.predict(queries))
    return out


def op_groups(backbone: Backbone, clf: FewShotClassifier, images: list[Image.Image]) -> dict[str, float]:
    """Self CPU seconds per `OP_GROUPS` group (plus ``other``) of one forward of `images` by `clf`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        clf._forward(images)
    groups = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
    for event in prof.key_averages():
        name = next((g for g, ops in OP_GROUPS.items() if any(event.key.startswith(o) for o in ops)), "other")
        groups[name] += event.self_cpu_time_total / 1e6
    return groups


def measure(args: argparse.Namespace) -> dict:
    """Everything for one ISA, in this process: timings, agreement, profile and auto's choice."""
    from recycle.quantize import choose_precision

    if args.isa == "avx2":
        torch.backends.quantized.engine = "onednn"
    torch.manual_seed(args.seed)
    backbone = Backbone(timm.create_model(MODEL_NAME, pretrained=False), MODEL_NAME)
    for p in backbone.parameters():
        p.requires_grad_(False)
    lora = make_adapter(backbone, rank=4, seed=args.seed)
    task = make_task(5, 5, 2 * args.repeats, args.seed)  # 10 fresh queries per repeat
    held_out = make_task(5, 0, 8 if args.quick else 40, args.seed + 1).queries
    variants = ["fp32", "bf16", *(["int8"] if int8_supported() else [])]
    if _torchao_available() and int8_supported():
        variants.append("int8-torchao")
    pairs = {v: classifiers(backbone, lora, v) for v in variants}
    for pair in pairs.values():  # the support is cached before the timed requests, as in a warm app
        request(pair, task, task.queries[:1])
    timings: dict[str, list[dict]] = {v: [] for v in variants}
    answers: dict[str, list] = {v: [] for v in variants}
    for rep in range(args.repeats):
        queries = task.queries[rep :: args.repeats]
        for v in rotated(variants, rep):
            gc.collect()
            for clf in pairs[v]:
                clf.clear_cache()
                clf.embed(task.support)  # support cached, queries fresh
            out, t = timed(lambda: request(pairs[v], task, queries))
            timings[v].append({"wall": t.wall, "cpu": t.cpu, "others_cpu": t.others_cpu})
            answers[v].append(out)
            print(f"[{args.isa} {rep + 1}/{args.repeats}] {v:13s} {t.wall:6.3f} s wall {t.cpu:6.3f} s CPU", flush=True)
    reference = pairs["fp32"][0].predict_proba(held_out)
    agreement = {}
    for v in variants:
        probs = pairs[v][0].predict_proba(held_out)
        agreement[v] = {
            "same": int((probs.argmax(-1) == reference.argmax(-1)).sum()),
            "n": len(held_out),
            "max_prob_diff": float((probs - reference).abs().max()),
        }
    profiles = {v: op_groups(backbone, pairs[v][0], task.queries[:10]) for v in variants}
    choice, why = choose_precision(backbone)
    return {
        "isa": args.isa,
        "env": environment(("timm", *(["torchao"] if _torchao_available() else []))),
        "native_bf16": native_bf16("cpu"),
        "int8_supported": int8_supported(),
        "timings": timings,
        "agreement": agreement,
        "profiles": profiles,
        "auto": [choice, why],
    }


# ----------------------------------------------------------------------------------------------------- end to end
def app_latency(args: argparse.Namespace) -> dict:
    """Cold and warm latency of the few-shot request through the app, per RECYCLE_PRECISION."""
    from gradio_client import Client, handle_file
    from timm.models import save_for_hf

    import app
    from app_ui import AppSettings
    from recycle.formats import save_adapter

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(args.seed)
        model = timm.create_model(MODEL_NAME, pretrained=False)
        save_for_hf(model, root / "clip", safe_serialization=True)
        backbone = Backbone(model, str(root / "clip"))
        save_adapter(make_adapter(backbone, rank=4, seed=args.seed), root / "meta-lora")
        del model, backbone
        task = make_task(5, 5, 2 * (args.app_requests + 1), args.seed)
        paths = []
        for i, im in enumerate(task.support + task.queries):
            paths.append(root / "images" / f"{i}.png")
            paths[-1].parent.mkdir(exist_ok=True)
            im.save(paths[-1])
        support, queries = paths[: len(task.support)], paths[len(task.support) :]
        slots = {}
        for c in range(5):
            slots[f"class_{c + 1}_name"] = f"class {c}"
            slots[f"class_{c + 1}_images"] = [
                {"image": handle_file(str(p)), "caption": None} for p, y in zip(support, task.support_labels) if y == c
            ]
        for precision in ("fp32", "int8", "auto"):
            settings = AppSettings(
                backbone=str(root / "clip"), weights=root / "no-weights", pool=root / "pool", precision=precision
            )
            demo = app.build_demo(settings=settings)
            _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
            client = Client(url, verbose=False)
            try:
                times = []
                for r in range(args.app_requests + 1):
                    batch = queries[2 * r : 2 * r + 2] * 5  # 10 queries, fresh ones each request
                    t0 = time.perf_counter()
                    client.predict(
                        queries=[handle_file(str(q)) for q in batch],
                        backbone=str(root / "clip"),
                        lora=str(root / "meta-lora"),
                        api_name="/classify",
                        **slots,
                    )
                    times.append(time.perf_counter() - t0)
                    print(f"[app {precision}] request {r}: {times[-1]:.2f} s", flush=True)
                status = client.predict(backbone=str(root / "clip"), lora=str(root / "meta-lora"), api_name="/status")
            finally:
                client.close()
                demo.close()
            out[precision] = {"cold": times[0], "warm": times[1:], "status": status}
    return out


# ---------------------------------------------------------------------------------------------------------- report
def _ratio_rows(result: dict) -> list[list[str]]:
    t = result["timings"]
    rows = []
    for v in t:
        if v == "fp32":
            continue
        for kind in ("cpu", "wall"):
            ratios = [a[kind] / b[kind] for a, b in zip(t["fp32"], t[v])]
            rows.append([f"fp32 / {v}", kind, Summary.of(ratios).format(".2f")])
    return rows


def _variant_rows(result: dict) -> list[list[str]]:
    rows = []
    for v, ts in result["timings"].items():
        a = result["agreement"][v]
        rows.append(
            [
                v,
                Summary.of(x["wall"] for x in ts).format(".3f"),
                Summary.of(x["cpu"] for x in ts).format(".3f"),
                f"{a['same']} / {a['n']} ({100 * a['same'] / a['n']:.1f}%)",
                f"{a['max_prob_diff']:.3f}",
            ]
        )
    return rows


def _profile_rows(result: dict) -> list[list[str]]:
    variants = list(result["profiles"])
    groups = list(next(iter(result["profiles"].values())))
    return [[g, *(f"{result['profiles'][v][g]:.3f}" for v in variants)] for g in groups]


def _verdict(result: dict) -> str:
    t = result["timings"]
    if "int8" not in t:
        return "int8 kernels are not available on this CPU: nothing to compare."
    ratio = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(t["fp32"], t["int8"]))
    agree = result["agreement"]["int8"]["same"] / result["agreement"]["int8"]["n"]
    return (
        f"int8 against fp32 here: {ratio:.2f}× in CPU time (target ≥ {SPEED_TARGET} on a CPU without native bf16: "
        f"{'met' if ratio >= SPEED_TARGET else 'missed'}), {100 * agree:.1f}% of predictions equal (target ≥ "
        f"{100 * AGREEMENT_TARGET:.0f}%: {'met' if agree >= AGREEMENT_TARGET else 'missed'}). `auto` chooses "
        f"**{result['auto'][0]}** on this backbone ({result['auto'][1]})."
    )


def report(results: list[dict], app: Optional[dict], args: argparse.Namespace, started: str, elapsed: float) -> str:
    sections = [
        report_header(
            "Few-shot request in fp32, bf16 and int8 (CPU)",
            "bench_int8.py",
            results[0]["env"],
            started,
            f"the whole run took {elapsed / 60:.1f} min",
        ),
        "## Setup\n\n" + __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
    ]
    for result in results:
        title = {"native": "This CPU as it is", "avx2": "An AVX2-only CPU without native bf16 (emulated)"}
        sections.append(
            f"## {title[result['isa']]}\n\n"
            + (
                "Environment changes: "
                + ", ".join(f"`{k}={v}`" for k, v in ISA_ENV[result["isa"]].items())
                + ", quantized engine `onednn`; torch CPU capability "
                f"{result['env']['torch CPU capability']}.\n\n"
                if ISA_ENV[result["isa"]]
                else ""
            )
            + f"{args.repeats} repeats, variants interleaved; the request is `fit` + `predict` of 10 fresh queries "
            "with the meta-LoRA and with the backbone alone (support cached). Median [min, max].\n\n"
            + markdown_table(["ratio", "time", "median [min, max]"], _ratio_rows(result))
            + "\n\n"
            + markdown_table(
                ["variant", "wall s", "CPU s", "same prediction as fp32 (held-out queries)", "max prob diff"],
                _variant_rows(result),
            )
            + "\n\n"
            + _verdict(result)
            + "\n\n"
            + contention_of(
                sum(x["others_cpu"] for ts in result["timings"].values() for x in ts),
                sum(x["wall"] for ts in result["timings"].values() for x in ts),
                column=False,
            )
            + "\n\nSelf CPU seconds by op group, one 10-query forward with the meta-LoRA (`torch.profiler`):\n\n"
            + markdown_table(["ops", *result["profiles"]], _profile_rows(result))
        )
    if app is not None:
        rows = [
            [p, f"{r['cold']:.2f}", Summary.of(r["warm"]).format(".2f"), r["status"].split("on ", 1)[-1].strip()]
            for p, r in app.items()
        ]
        sections.append(
            "## The app end to end (`gradio_client`, this CPU as it is)\n\n"
            f"One cold request (loading, calibration and quantisation included) and {args.app_requests} warm ones "
            "(support cached, fresh queries), per `RECYCLE_PRECISION`.\n\n"
            + markdown_table(["RECYCLE_PRECISION", "cold s", "warm s (median [min, max])", "status line"], rows)
        )
    sections.append(
        "What random weights mean here: the speed is that of the real architecture; the agreement compares int8 "
        "with fp32 on a random network whose class margins are small, so it bounds how often int8's rounding flips "
        "an answer near a tie rather than measuring a trained CLIP's answers."
    )
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 app requests, no file")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every variant (default 5, quick 1)")
    parser.add_argument("--isa", nargs="+", choices=sorted(ISA_ENV), default=["native", "avx2"])
    parser.add_argument("--app-requests", type=int, default=None, help="warm app requests (default 4, quick 1)")
    parser.add_argument("--no-app", action="store_true", help="skip the end-to-end app measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results file (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    parser.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.app_requests = args.app_requests or (1 if args.quick else 4)
    tune_allocator()
    if args.result_file is not None:  # a worker: one ISA, in this fresh process
        args.isa = args.isa[0]
        args.result_file.write_text(json.dumps(measure(args)))
        return
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    common = ["--repeats", str(args.repeats), "--seed", str(args.seed), *(["--quick"] if args.quick else [])]
    results = [run_worker("benchmarks.bench_int8", [*common, "--isa", isa], ISA_ENV[isa] or None) for isa in args.isa]
    app = None if args.no_app else app_latency(args)
    text = report(results, app, args, started, time.perf_counter() - t0)
    print("\n" + text)
    write_results(text, args.out if args.out is not None else (None if args.quick else DEFAULT_OUT))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()

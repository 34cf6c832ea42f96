"""Few-shot classifier benchmark on CPU: overhead over the bare timm forward, bf16 autocast, embedding cache.

Backbone: timm ``vit_base_patch16_clip_224.openai`` (CLIP ViT-B/16 at 224 px, 512-d projection head) with RANDOM
weights, since nothing can be downloaded here. Task: N-way K-shot with Q queries per class, synthetic RGB images
of 256-320 px (so preprocessing does a real bicubic resize); each class is a random low-frequency colour pattern and
each image a noisy variant of it, so even a random ViT separates the classes somewhat.

Six variants run interleaved in every repeat (their order rotates from one repeat to the next) and every ratio is
taken within a repeat, then summarised as median [min, max] over repeats:

- ``bare``: ``model.head(model.forward_head(model.forward_features(x), pre_logits=True))`` under
  `torch.inference_mode` on tensors preprocessed beforehand, in the classifier's batches (support, then queries);
- ``bare+lora``: the same with a rank-4 q/v LoRA injected and not merged (the `LoRALinear` forward);
- ``clf`` / ``clf+lora``: a fresh `FewShotClassifier` (empty cache), ``fit(support)`` + ``predict_proba(queries)``
  from PIL images, then the same ``fit`` again (cache hit); ``clf+lora`` passes the LoRA as ``lora=`` and so pays
  for however the classifier attaches it (inject, merge, remove) on every call;
- ``clf-bf16`` / ``clf+lora-bf16``: the same with ``bf16=True``.

After the timed repeats, one batch of queries goes through the backbone's forward under `torch.profiler` in fp32 and
under the classifier's bf16 autocast (`recycle.runtime.mixed_precision`), once per repeat, interleaved: the self
time of every aten op, grouped into linear layers, attention, GELU/LayerNorm, casts and copies and the rest
(`OP_GROUPS`), shows which part of the forward bf16 speeds up and which it does not.

Run from the repository root (the defaults take about 8 minutes on 2 idle cores, estimated from their CPU time, and
took 12-18 minutes while other processes used half the machine or more; ``--quick`` is a smoke run of about a
minute that writes no file unless ``--out`` is given):

    python -m benchmarks.bench_fewshot [--quick] [--repeats N] [--malloc tuned|default] [--out FILE]

glibc malloc is tuned as the app and ``recycle predict`` tune it (`recycle.runtime.tune_allocator`) unless
``--malloc default``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import timm
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    REPO,
    Summary,
    Timing,
    contention,
    environment,
    markdown_table,
    report_header,
    timed,
    write_results,
)
from recycle.backbone import Backbone
from recycle.fewshot import FewShotClassifier, compute_prototypes, prototype_logits
from recycle.formats import LoRAAdapter
from recycle.lora import LoRAConfig, inject_lora, lora_layers, remove_lora
from recycle.runtime import allocator_settings, mixed_precision, tune_allocator

MODEL_NAME = "vit_base_patch16_clip_224.openai"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "fewshot.md"
OVERHEAD_TARGET = 1.1
BF16_TARGET = 2.0  # fp32 / bf16 time of the classifier
VARIANTS = ("bare", "bare+lora", "clf", "clf+lora", "clf-bf16", "clf+lora-bf16")
# (label, numerator variant, denominator variant): ratios of total time (bare: support + query forward;
# classifier: fit + predict_proba), taken within each repeat.
RATIOS = (
    ("classifier overhead, no LoRA (target <= 1.1)", "clf", "bare"),
    ("classifier + LoRA over plain bare forward (target <= 1.1)", "clf+lora", "bare"),
    ("classifier + LoRA over bare forward with the LoRA unmerged", "clf+lora", "bare+lora"),
    ("cost of unmerged LoRA layers in the bare forward", "bare+lora", "bare"),
    ("bf16 speed-up, no LoRA (fp32 / bf16; target >= 2.0)", "clf", "clf-bf16"),
    ("bf16 speed-up, with LoRA (fp32 / bf16; target >= 2.0)", "clf+lora", "clf+lora-bf16"),
)


@dataclass
class Task:
    """A few-shot episode as PIL images with integer labels."""

    support: list[Image.Image]
    support_labels: list[int]
    queries: list[Image.Image]
    query_labels: list[int]


@dataclass
class Run:
    """One variant in one repeat.

    Attributes:
        phases: timed phases (bare: ``support``, ``queries``; classifier: ``ctor``, ``fit``, ``predict``, ``refit``).
        total: the time the ratios compare: support + query forward, or fit + predict_proba.
        probs: ``(Q, C)`` query probabilities (for bare runs, ProtoNet on the bare embeddings).
        embeddings: ``(S + Q, D)`` support then query embeddings.
        stats: the classifier's counters after fit, predict_proba and the second fit (empty for bare runs).
    """

    phases: dict[str, Timing]
    total: Timing
    probs: torch.Tensor
    embeddings: torch.Tensor
    stats: dict[str, int] = field(default_factory=dict)


def make_task(n_way: int, shots: int, queries: int, seed: int) -> Task:
    """Synthetic episode: class = random 6x6 colour pattern, image = pattern + low- and high-frequency noise."""
    rng = np.random.default_rng(seed)
    bases = rng.uniform(0, 255, size=(n_way, 6, 6, 3))

    def image(c: int) -> Image.Image:
        low = np.clip(bases[c] + rng.normal(0, 40, size=bases[c].shape), 0, 255).astype(np.uint8)
        w, h = (int(s) for s in rng.integers(256, 321, size=2))
        arr = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        return Image.fromarray(np.clip(arr + rng.normal(0, 20, size=arr.shape), 0, 255).astype(np.uint8))

    support_labels = [c for c in range(n_way) for _ in range(shots)]
    query_labels = [c for c in range(n_way) for _ in range(queries)]
    return Task([image(c) for c in support_labels], support_labels, [image(c) for c in query_labels], query_labels)


def make_adapter(backbone: Backbone, rank: int, seed: int) -> LoRAAdapter:
    """A q/v LoRA of `rank` on every block with random (non-zero) B, so that it changes the outputs."""
    config = LoRAConfig(targets=("qv",), rank=rank)
    gen = torch.Generator().manual_seed(seed)
    inject_lora(backbone.model, config)
    with torch.no_grad():
        for _, layer in lora_layers(backbone.model):
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    adapter = LoRAAdapter.from_model(backbone.model, config, backbone=MODEL_NAME)
    remove_lora(backbone.model)
    return adapter


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The timm forward the classifier wraps: pre-logits [CLS] through CLIP's projection head."""
    return torch.cat([model.head(model.forward_head(model.forward_features(x), pre_logits=True)) for x in batches])


def run_bare(backbone: Backbone, task: Task, batch_size: int, adapter: Optional[LoRAAdapter]) -> Run:
    """Bare forward over already preprocessed tensors in the classifier's batches; LoRA injected outside timing."""
    support = list(torch.split(backbone.preprocess(task.support), batch_size))
    queries = list(torch.split(backbone.preprocess(task.queries), batch_size))
    if adapter is not None:
        adapter.inject(backbone.model)
    try:
        emb_s, t_s = timed(lambda: bare_forward(backbone.model, support))
        emb_q, t_q = timed(lambda: bare_forward(backbone.model, queries))
    finally:
        if adapter is not None:
            remove_lora(backbone.model)
    probs = prototype_logits(emb_s, torch.tensor(task.support_labels), emb_q).softmax(dim=-1)
    return Run({"support": t_s, "queries": t_q}, t_s + t_q, probs, torch.cat([emb_s, emb_q]))


def run_classifier(backbone: Backbone, task: Task, batch_size: int, adapter: Optional[LoRAAdapter], bf16: bool) -> Run:
    """Fresh classifier: construct, fit, predict_proba, then fit the same support again (all cache hits)."""
    clf, t_ctor = timed(lambda: FewShotClassifier(backbone, lora=adapter, batch_size=batch_size, bf16=bf16))
    _, t_fit = timed(lambda: clf.fit(task.support, task.support_labels))
    probs, t_pred = timed(lambda: clf.predict_proba(task.queries))
    _, t_refit = timed(lambda: clf.fit(task.support, task.support_labels))
    stats = dict(clf.stats)
    embeddings = clf.embed(task.support + task.queries)  # all cached: no forward
    return Run(
        {"ctor": t_ctor, "fit": t_fit, "predict": t_pred, "refit": t_refit}, t_fit + t_pred, probs, embeddings, stats
    )


def warm_up(backbone: Backbone, task: Task, adapter: LoRAAdapter) -> None:
    """One small untimed pass through every code path (fp32 / bf16, with and without LoRA)."""
    images = task.support[:2]
    for lora in (None, adapter):
        for bf16 in (False, True):
            FewShotClassifier(backbone, lora=lora, bf16=bf16).embed(images)


# aten ops by what they do in a ViT forward; the self time of everything else is "other". Attention is grouped whole:
# fp32 runs timm's fused kernel, bf16 its explicit form (two batched matmuls around a softmax; `mixed_precision`).
OP_GROUPS = {
    "linear layers and the patch convolution": (
        "aten::addmm",
        "aten::mm",
        "aten::mkldnn_convolution",
        "aten::_convolution",
    ),
    "attention (fused, or bmm + softmax + bmm)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_softmax",
    ),
    "GELU, LayerNorm": ("aten::gelu", "aten::native_layer_norm"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
}


def op_breakdown(backbone: Backbone, batch: torch.Tensor, bf16: bool) -> dict[str, float]:
    """Self time in seconds per `OP_GROUPS` group (plus ``other``) of one `Backbone.embed` forward, as the classifier
    runs it (`mixed_precision` when `bf16`); profiler self time is wall time of the op on the calling thread."""
    with torch.inference_mode(), mixed_precision(backbone.model, "cpu", bf16):
        backbone.embed(batch[:2])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            backbone.embed(batch)
    groups = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
    by_op = {op: group for group, ops in OP_GROUPS.items() for op in ops}
    for event in prof.key_averages():
        groups[by_op.get(event.key, "other")] += event.self_cpu_time_total / 1e6
    return groups


def median_groups(profiles: dict[bool, list[dict[str, float]]]) -> dict[bool, dict[str, float]]:
    """{bf16: {group: median seconds over the profiled forwards}}."""
    return {bf16: {g: Summary.of(p[g] for p in ps).median for g in ps[0]} for bf16, ps in profiles.items()}


def breakdown_rows(med: dict[bool, dict[str, float]]) -> list[list[str]]:
    """`median_groups` as rows: seconds per group in fp32 and bf16, the group's share of the bf16 forward and its
    fp32 / bf16 ratio."""
    totals = {bf16: sum(m.values()) for bf16, m in med.items()}
    rows = [
        [
            g,
            f"{med[False][g]:.3f}",
            f"{med[True][g]:.3f}",
            f"{100 * med[True][g] / totals[True]:.1f}%",
            f"{med[False][g] / med[True][g]:.2f}x" if med[True][g] > 0 else "-",
        ]
        for g in med[False]
    ]
    rows.append(
        ["total", f"{totals[False]:.3f}", f"{totals[True]:.3f}", "100%", f"{totals[False] / totals[True]:.2f}x"]
    )
    return rows


def ratio_rows(runs: dict[str, list[Run]]) -> list[list[str]]:
    """Within-repeat ratios of total wall and CPU time summarised over repeats, and the ratio of the best times."""
    rows = []
    for label, num, den in RATIOS:
        pairs = list(zip(runs[num], runs[den]))
        wall = Summary.of(a.total.wall / b.total.wall for a, b in pairs)
        cpu = Summary.of(a.total.cpu / b.total.cpu for a, b in pairs)
        best = min(r.total.wall for r in runs[num]) / min(r.total.wall for r in runs[den])
        rows.append([label, f"{num} / {den}", wall.format(), cpu.format(), f"{best:.3f}"])
    return rows


def variant_rows(runs: dict[str, list[Run]], n_images: int) -> list[list[str]]:
    rows = []
    for name in VARIANTS:
        wall = Summary.of(r.total.wall for r in runs[name])
        cpu = Summary.of(r.total.cpu for r in runs[name])
        rate = Summary.of(n_images / r.total.wall for r in runs[name])
        others = Summary.of(r.total.others_cpu for r in runs[name])
        faults = Summary.of(r.total.minor_faults for r in runs[name])
        rows.append(
            [
                name,
                wall.format(".2f"),
                cpu.format(".2f"),
                rate.format(".2f"),
                others.format(".1f"),
                faults.format(".0f"),
            ]
        )
    return rows


def raw_rows(runs: dict[str, list[Run]]) -> list[list[str]]:
    rows = []
    for rep in range(len(runs[VARIANTS[0]])):
        for name in VARIANTS:
            for phase, t in runs[name][rep].phases.items():
                rows.append(
                    [
                        str(rep + 1),
                        name,
                        phase,
                        f"{t.wall:.3f}",
                        f"{t.cpu:.3f}",
                        f"{t.cpu / t.wall:.2f}" if t.wall > 0 else "-",
                        f"{t.others_cpu:.2f}",
                        str(t.minor_faults),
                    ]
                )
    return rows


def agreement_rows(runs: dict[str, list[Run]], task: Task) -> list[list[str]]:
    """bf16 against fp32 predictions of the same classifier, from the first repeat."""
    labels = torch.tensor(task.query_labels)
    n_sup = len(task.support)
    rows = []
    for fp32, bf16 in (("clf", "clf-bf16"), ("clf+lora", "clf+lora-bf16")):
        a, b = runs[fp32][0], runs[bf16][0]
        pa, pb = a.probs, b.probs
        same = int((pa.argmax(-1) == pb.argmax(-1)).sum())
        max_dp = float((pa - pb).abs().max())
        top2 = pa.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        near_ties = int((margin < 2 * max_dp).sum())
        err = ((b.embeddings - a.embeddings).norm(dim=-1) / a.embeddings.norm(dim=-1)).median()
        protos = compute_prototypes(a.embeddings[:n_sup], torch.tensor(task.support_labels))
        gap = torch.pdist(protos).min() / a.embeddings.norm(dim=-1).mean()
        q = torch.nn.functional.normalize(a.embeddings[n_sup:], dim=-1)
        cos = (q @ q.T)[~torch.eye(len(q), dtype=torch.bool)].mean()
        rows.append(
            [
                f"{fp32} vs {bf16}",
                f"{same}/{len(pa)} ({100 * same / len(pa):.1f}%)",
                f"{max_dp:.2e}",
                f"{float((pa.argmax(-1) == labels).float().mean()):.3f}",
                f"{float((pb.argmax(-1) == labels).float().mean()):.3f}",
                f"{float(margin.median()):.3f}",
                str(near_ties),
                f"{float(err):.2e}",
                f"{float(gap):.3f}",
                f"{float(cos):.4f}",
            ]
        )
    return rows


def consistency_rows(runs: dict[str, list[Run]]) -> list[list[str]]:
    """Sanity: the classifier and the bare forward compute the same thing; runs are deterministic across repeats."""
    rows = []
    for clf, bare in (("clf", "bare"), ("clf+lora", "bare+lora")):
        dp = float((runs[clf][0].probs - runs[bare][0].probs).abs().max())
        rows.append([f"max abs prob diff {clf} vs {bare} (repeat 1)", f"{dp:.2e}"])
    for name in VARIANTS:
        drift = max(float((r.probs - runs[name][0].probs).abs().max()) for r in runs[name])
        rows.append([f"max abs prob diff of {name} across repeats", f"{drift:.2e}"])
    return rows


def cache_rows(runs: dict[str, list[Run]]) -> list[list[str]]:
    rows = []
    for name in ("clf", "clf+lora", "clf-bf16", "clf+lora-bf16"):
        rs = runs[name]
        miss = Summary.of(r.phases["fit"].wall for r in rs)
        hit = Summary.of(r.phases["refit"].wall for r in rs)
        speedup = Summary.of(r.phases["fit"].wall / r.phases["refit"].wall for r in rs)
        stats = rs[0].stats
        rows.append(
            [
                name,
                miss.format(".3f"),
                f"{1e3 * hit.median:.2f} [{1e3 * hit.min:.2f}, {1e3 * hit.max:.2f}]",
                speedup.format(".0f"),
                str(stats["embedded"]),
                str(stats["cache_hits"]),
            ]
        )
    return rows


def verdict(runs: dict[str, list[Run]]) -> list[str]:
    """The overhead and bf16 targets, judged on wall and on CPU time, with the contention each side saw."""

    def judge(ratio: float) -> str:
        return "meets" if ratio <= OVERHEAD_TARGET else "MISSES"

    def judge_bf16(ratio: float) -> str:
        return "meets" if ratio >= BF16_TARGET else "MISSES"

    lines = []
    for num in ("clf", "clf+lora"):
        pairs = list(zip(runs[num], runs["bare"]))
        wall = Summary.of(a.total.wall / b.total.wall for a, b in pairs).median
        cpu = Summary.of(a.total.cpu / b.total.cpu for a, b in pairs).median
        others = [Summary.of(r.total.others_cpu for r in runs[name]).median for name in (num, "bare")]
        lines.append(
            f"- `{num} / bare` (target <= {OVERHEAD_TARGET}x): median {wall:.3f}x wall ({judge(wall)}), "
            f"{cpu:.3f}x CPU ({judge(cpu)}); other processes used a median {others[0]:.1f} CPU-s during "
            f"`{num}` and {others[1]:.1f} CPU-s during `bare`."
        )
    for fp32, bf16 in (("clf", "clf-bf16"), ("clf+lora", "clf+lora-bf16")):
        pairs = list(zip(runs[fp32], runs[bf16]))
        wall = Summary.of(a.total.wall / b.total.wall for a, b in pairs).median
        cpu = Summary.of(a.total.cpu / b.total.cpu for a, b in pairs).median
        lines.append(
            f"- `{fp32} / {bf16}` (target >= {BF16_TARGET}x): median {wall:.3f}x wall ({judge_bf16(wall)}), "
            f"{cpu:.3f}x CPU ({judge_bf16(cpu)})."
        )
    return lines


def breakdown_summary(med: dict[bool, dict[str, float]]) -> str:
    """One sentence from `median_groups`: bf16's speed-up of the linear layers and of the rest, and the rest's share
    of the bf16 forward."""
    linear = next(iter(OP_GROUPS))
    rest = {bf16: sum(v for g, v in m.items() if g != linear) for bf16, m in med.items()}
    return (
        f"bf16 runs the linear layers {med[False][linear] / med[True][linear]:.2f}x faster than fp32 and "
        f"everything else {rest[False] / rest[True]:.2f}x; everything else is "
        f"{100 * rest[True] / sum(med[True].values()):.0f}% of the bf16 forward."
    )


def report(
    args: argparse.Namespace,
    env: dict[str, str],
    task: Task,
    runs: dict[str, list[Run]],
    med: dict[bool, dict[str, float]],
    started: str,
    elapsed: float,
) -> str:
    n_way, n_sup, n_q = len(set(task.support_labels)), len(task.support), len(task.queries)
    n_images = n_sup + n_q
    malloc = ", ".join(f"{k}={v}" for k, v in allocator_settings().items())
    sections = [
        report_header(
            "Few-shot classifier benchmark (CPU)",
            "bench_fewshot.py",
            env,
            started,
            f"the whole run took {elapsed / 60:.1f} min",
        ),
        "## Setup\n\n"
        f"- Backbone: timm `{MODEL_NAME}` built with `pretrained=False` (random weights, seed {args.seed}), "
        "wrapped in `recycle.backbone.Backbone` (embedding = 512-d CLIP projection). The `.openai` tag selects the "
        "app's default configuration (512-d projection head, CLIP mean/std); the untagged name resolves to an "
        "ImageNet fine-tune with a 1000-class head.\n"
        f"- Task: {n_way}-way {n_sup // n_way}-shot, {n_q} queries ({n_images} synthetic images of 256-320 px).\n"
        f"- Batch size {args.batch_size}, in the classifier's batches: support, then queries.\n"
        + (
            f"- glibc malloc tuned by `recycle.runtime.tune_allocator` ({malloc}), as `python app.py` and "
            "`recycle predict` do.\n"
            if malloc
            else "- glibc malloc with its defaults (`--malloc default`).\n"
        )
        + "- LoRA: rank-4 q/v on all 12 blocks (`inject_lora` + `LoRAAdapter.from_model`), B ~ N(0, 0.02). "
        "`bare+lora` injects it unmerged; `clf+lora` passes it as `lora=` and gets whatever the classifier does.\n"
        f"- {args.repeats} repeat(s) of all {len(VARIANTS)} variants, interleaved, the order rotated each repeat. "
        "Ratios are taken within a repeat, then summarised as median [min, max].\n"
        "- Wall = `time.perf_counter`; CPU = `time.process_time` (all threads of the process); others' CPU = CPU "
        "time the rest of the machine used meanwhile (`/proc/stat`); faults = minor page faults. Totals: bare = "
        "support + query forward; classifier = `fit` + `predict_proba` (construction, which attaches the LoRA once "
        "to check that it fits, and the second, cached `fit` are listed separately in the raw table).",
        "## Ratios\n\n"
        + markdown_table(
            ["ratio", "variants", "wall (median [min, max])", "CPU (median [min, max])", "best wall / best wall"],
            ratio_rows(runs),
        )
        + "\n\n"
        + "\n".join(verdict(runs))
        + "\n\n"
        + contention(r.total for rs in runs.values() for r in rs)
        + " CPU-time ratios are less sensitive to it, and "
        "the best-of-repeats ratio discards the slowest runs.",
        "## Per variant (totals, median [min, max])\n\n"
        + markdown_table(
            ["variant", "wall s", "CPU s", "images/s (wall)", "others' CPU s", "minor faults"],
            variant_rows(runs, n_images),
        ),
        f"## Where the forward's time goes (one batch of {min(args.batch_size, n_q)} queries, torch.profiler)\n\n"
        + markdown_table(["ops (self time)", "fp32 s", "bf16 s", "share of bf16", "fp32 / bf16"], breakdown_rows(med))
        + "\n\n"
        f"Median of {args.repeats} profiled forwards per format (`Backbone.embed`, fp32 and under the "
        "classifier's bf16 autocast, interleaved). " + breakdown_summary(med) + " The profiler's self times "
        "are wall times of each op on the calling thread, measured apart from the timed repeats above.",
        "## bf16 autocast vs fp32: predictions\n\n"
        + markdown_table(
            [
                "pair",
                "same argmax",
                "max abs prob diff",
                "fp32 acc",
                "bf16 acc",
                "median fp32 top1-top2 margin",
                "near ties (margin < 2x max diff)",
                "median rel. embedding error",
                "min prototype gap / norm",
                "mean query cosine",
            ],
            agreement_rows(runs, task),
        )
        + "\n\n"
        "What random weights mean here: the speed numbers are those of the real architecture, but the predictions "
        "are not those of CLIP. A random ViT maps all images to nearly parallel embeddings (mean query cosine), so "
        "the prototypes are close together and the class margins small; the synthetic classes are built to be "
        "separable even so (fp32 acc). The agreement therefore measures bf16's numerical perturbation (relative "
        "embedding error, max prob difference) against this network's margins, counting the queries close enough "
        "to a tie to flip (near ties). It is evidence about the size of the bf16 error, not about how often a "
        "trained CLIP would change its answer: re-measure on a real episode with real weights before relying on it.",
        "## Embedding cache: fitting the same support again\n\n"
        + markdown_table(
            [
                "classifier",
                "fit, fresh (miss) s",
                "fit again (hit) ms",
                "miss / hit",
                "stats: embedded",
                "stats: cache_hits",
            ],
            cache_rows(runs),
        )
        + "\n\n"
        f"Counters after `fit` ({n_sup}), `predict_proba` ({n_q}) and the second `fit` ({n_sup}) of the first repeat.",
        "## Consistency checks\n\n" + markdown_table(["check", "value"], consistency_rows(runs)),
        "## Raw measurements\n\n"
        + markdown_table(
            ["repeat", "variant", "phase", "wall s", "CPU s", "CPU / wall", "others' CPU s", "minor faults"],
            raw_rows(runs),
        ),
    ]
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 shot and 1 query per class")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every variant (default 3, quick 1)")
    parser.add_argument("--ways", type=int, default=5, help="classes per episode (default 5)")
    parser.add_argument("--shots", type=int, default=5, help="support images per class (default 5)")
    parser.add_argument("--queries", type=int, default=15, help="queries per class (default 15)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and LoRA (default 0)")
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc malloc: recycle.runtime.tune_allocator, as the app and `recycle predict` do, or "
        "glibc's defaults (default tuned)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default {DEFAULT_OUT.relative_to(REPO)}; quick runs write none)",
    )
    args = parser.parse_args()
    if args.malloc == "tuned":
        tune_allocator()
    if args.quick:
        args.shots, args.queries = 1, 1
    args.repeats = args.repeats or (1 if args.quick else 3)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    backbone = Backbone(timm.create_model(MODEL_NAME, pretrained=False), MODEL_NAME)
    for p in backbone.parameters():
        p.requires_grad_(False)
    task = make_task(args.ways, args.shots, args.queries, args.seed)
    adapter = make_adapter(backbone, rank=4, seed=args.seed)
    env = environment(("timm", "numpy", "pillow"))
    for k, v in env.items():
        print(f"{k}: {v}")
    print(
        f"task: {args.ways}-way {args.shots}-shot, {len(task.queries)} queries; embedding {backbone.embedding} "
        f"({backbone.embed_dim}-d); {args.repeats} repeat(s)"
    )
    warm_up(backbone, task, adapter)

    variants: dict[str, Callable[[], Run]] = {
        "bare": lambda: run_bare(backbone, task, args.batch_size, None),
        "bare+lora": lambda: run_bare(backbone, task, args.batch_size, adapter),
        "clf": lambda: run_classifier(backbone, task, args.batch_size, None, bf16=False),
        "clf+lora": lambda: run_classifier(backbone, task, args.batch_size, adapter, bf16=False),
        "clf-bf16": lambda: run_classifier(backbone, task, args.batch_size, None, bf16=True),
        "clf+lora-bf16": lambda: run_classifier(backbone, task, args.batch_size, adapter, bf16=True),
    }
    runs: dict[str, list[Run]] = {name: [] for name in VARIANTS}
    for rep in range(args.repeats):
        k = rep % len(VARIANTS)
        for name in VARIANTS[k:] + VARIANTS[:k]:
            gc.collect()
            run = variants[name]()
            runs[name].append(run)
            phases = ", ".join(f"{p} {t.wall:.2f}s/{t.cpu:.2f}s cpu" for p, t in run.phases.items())
            print(
                f"[repeat {rep + 1}/{args.repeats}] {name:14s} total {run.total.wall:7.2f}s wall "
                f"{run.total.cpu:7.2f}s cpu | {phases}",
                flush=True,
            )

    batch = backbone.preprocess(task.queries[: args.batch_size])
    profiles: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for rep in range(args.repeats):
        for bf16 in (False, True) if rep % 2 == 0 else (True, False):
            profiles[bf16].append(op_breakdown(backbone, batch, bf16))
    med = median_groups(profiles)
    print(breakdown_summary(med), flush=True)

    text = report(args, env, task, runs, med, started, time.perf_counter() - t_start)
    print("\n" + text)
    write_results(text, out)


if __name__ == "__main__":
    main()

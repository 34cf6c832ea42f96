"""The reproduction's written results: the results table, the plot, and the text of the shipped cards."""

from __future__ import annotations

from pathlib import Path


def method_name(run: str) -> str:
    """The results' name of a meta-training run: ``recycle-75-bf16`` -> ``LoRA Recycle-75 (bf16)``."""
    if run == "oracle":
        return "Oracle (real zoo images)"
    if run.endswith("-from-average"):
        return "LoRA Recycle" + run[len("recycle") : -len("-from-average")] + ", from the LoRAs-average"
    base, bf16, _ = run.partition("-bf16")
    return "LoRA Recycle" + base[len("recycle") :] + (" (bf16)" if bf16 else "")


def pipeline_command(results: dict) -> str:
    """The command that remakes a run's results (its preset, from the config's ``name``)."""
    name = results["config"].get("name", "v2")
    return f"python -m reproduce.pipeline --work .cache/repro --preset {name}"


def cross_name(results: dict) -> str:
    """The cross-domain split's script, as the results name it."""
    return {"hangul": "Hangul", "kana": "Kana"}[results["config"]["data"].get("cross_script", "hangul")]


def results_markdown(results: dict) -> str:
    s = results["summaries"]
    ev = s["eval"]
    methods = list(ev["test-1shot"]["results"])
    cross = cross_name(results)
    columns = {
        "test-1shot": "Han 1-shot",
        "test-5shot": "Han 5-shot",
        "cross-1shot": f"{cross} 1-shot",
        "cross-5shot": f"{cross} 5-shot",
    }
    check = results["config"]["data"].get("check_style")
    if check and f"test-{check}-1shot" in ev:  # the test characters in the foundation's own style: no damage there
        columns.update({f"test-{check}-1shot": f"Han {check} 1-shot", f"test-{check}-5shot": f"Han {check} 5-shot"})
    lines = [
        "| method | " + " | ".join(columns.values()) + " | meta-train s/step |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    names = {method_name(k[len("meta-") :]): k[len("meta-") :] for k in s if k.startswith("meta-")}
    for m in methods:
        cells = [f"{ev[k]['results'][m]['mean']:.2f} ± {ev[k]['results'][m]['ci95']:.2f}" for k in columns]
        step = s.get(f"meta-{names[m]}", {}).get("step_seconds_median") if m in names else None
        lines.append(
            f"| {m} | " + " | ".join(cells) + f" | {step:.3f} |" if step else f"| {m} | " + " | ".join(cells) + " | – |"
        )
    times = results["timings_seconds"]
    c = ev["test-1shot"]["config"]
    lines += [
        "",
        f"5-way, {c['query']} queries per class, {c['episodes']} episodes, mean ± 1.96·std/√n (%). "
        "Stage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; total {results['total_seconds'] / 60:.1f} min.",
        f"Teacher accuracy on its own synthetic images: {s['invert']['teacher_accuracy']:.3f}; on kept tokens: "
        + ", ".join(f"{r}: {v}" for r, v in s["invert"]["teacher_accuracy_kept_tokens"].items())
        + ".",
    ]
    style = results["config"]["data"].get("downstream_style", "plain")
    lines.append(
        f"Pretraining: {prior_source(s)}. Zoo, validation and test: "
        f"Han characters, {style}, {len(s['data']['fonts']['han'])} fonts; cross-domain: {cross}, {style}."
    )
    if "structure" in s:  # NN, LoRAs-average and the oracle on the same validation episodes
        r = {k: v["mean"] for k, v in s["structure"]["results"].items()}
        lines.append(
            f"Structure check (validation, {s['structure']['episodes']} episodes, 5-way 1-shot): NN "
            f"{r['NN']:.2f}, LoRAs-average + NN {r['LoRAs-average + NN']:.2f}, oracle "
            f"{r['Oracle (real zoo images)']:.2f}."
        )
    oracle = s["meta-oracle"]
    if oracle.get("baseline_val") is not None:  # the ceiling check, on the validation classes
        lines.append(
            f"Ceiling check (validation, {c['way']}-way 1-shot): NN {100 * oracle['baseline_val']:.2f}, "
            f"oracle {100 * oracle['best_val']:.2f} at step {oracle['best_step']} "
            f"({100 * (oracle['best_val'] - oracle['baseline_val']):+.2f})."
        )
    chosen = [(method_name(k[len("meta-") :]), v) for k, v in s.items() if k.startswith("meta-recycle")]
    if chosen and all(v.get("best_val") is not None for _, v in chosen):  # model selection, per meta-training run
        lines.append(
            f"Chosen on validation (best step, {c['way']}-way 1-shot; NN {100 * oracle['baseline_val']:.2f}; step 0 "
            "is the run's start): "
            + ", ".join(f"{m} {100 * v['best_val']:.2f} (step {v['best_step']})" for m, v in chosen)
            + "."
        )
    if "temperature" in s:
        t = s["temperature"]
        lines.append(
            f"Teacher temperature chosen on validation: {t['chosen']:g} (best validation accuracy after "
            f"{t['steps']} steps: "
            + ", ".join(f"T={k} {100 * v['best']:.2f}" for k, v in t["scores"].items())
            + f"; NN {100 * next(iter(t['scores'].values()))['nn']:.2f})."
        )
    if "bf16-check" in s:
        b = s["bf16-check"]
        lines.append(
            f"bf16 against fp32 meta-training (75% masked, the final step-{b['step']} meta-LoRAs, Han "
            "1-shot): "
            f"fp32 {b['fp32']['mean']:.2f} ± {b['fp32']['ci95']:.2f}, bf16 {b['bf16']['mean']:.2f} ± "
            f"{b['bf16']['ci95']:.2f} ({b['difference']:+.2f}, "
            f"{'within' if b['within_fp32_ci'] else 'outside'} the fp32 95% CI)."
        )
    if "surrogates" in s:  # the bare backbone on surrogate episodes against real episodes of the same zoo classes
        nn = s["surrogates"]["nn_accuracy"]
        lines.append(
            f"How hard the surrogate tasks are: NN scores {nn['surrogate']['mean']:.2f} ± "
            f"{nn['surrogate']['ci95']:.2f} on surrogate {c['way']}-way {s['surrogates']['shot']}-shot "
            f"episodes and {nn['real']['mean']:.2f} ± {nn['real']['ci95']:.2f} on real episodes of the same "
            "classes ([figure](surrogates.png))."
        )
        if "nn_accuracy_views" in s["surrogates"]:
            v = s["surrogates"]["nn_accuracy_views"]["surrogate"]
            lines.append(
                f"With meta-training's random views of each surrogate, as its episodes are drawn: NN scores "
                f"{v['mean']:.2f} ± {v['ci95']:.2f} on them."
            )
    return "\n".join(lines) + "\n"


TARGET_MINUTES = 150  # the pipeline's time budget on 2 quiet cores


def _apart(a: dict, b: dict) -> bool:
    """Whether two 95% intervals (``mean``, ``ci95``) do not overlap, `a` above `b`."""
    return a["mean"] - a["ci95"] > b["mean"] + b["ci95"]


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """The miniature's targets, each as (target, what was measured, met), computed from the results (5-way test
    episodes; the 1-shot rows unless named). Empty for a run without the rows they compare."""
    s = results["summaries"]
    ev = s["eval"]
    one, five = ev["test-1shot"]["results"], ev["test-5shot"]["results"]
    needed = ("NN", "LoRAs-average + NN", "LoRA Recycle", "LoRA Recycle-75", "Oracle (real zoo images)")
    if not all(m in one for m in needed):
        return []
    nn, avg, rec, rec75, oracle = (one[m] for m in needed)
    speed = s["meta-recycle"]["step_seconds_median"] / s["meta-recycle-75"]["step_seconds_median"]
    rows = [
        ("NN ≥ 45 at 1-shot", f"{nn['mean']:.2f}", nn["mean"] >= 45),
        ("Oracle − NN ≥ 8", f"{oracle['mean'] - nn['mean']:+.2f}", oracle["mean"] - nn["mean"] >= 8),
        (
            "LoRA Recycle − NN ≥ 5, intervals apart",
            f"{rec['mean'] - nn['mean']:+.2f} ({'apart' if _apart(rec, nn) else 'overlapping'})",
            rec["mean"] - nn["mean"] >= 5 and _apart(rec, nn),
        ),
        (
            "LoRA Recycle above LoRAs-average + NN, intervals apart",
            f"{rec['mean'] - avg['mean']:+.2f} "
            f"({'apart' if _apart(rec, avg) else 'overlapping' if rec['mean'] > avg['mean'] else 'below'})",
            _apart(rec, avg),
        ),
        (
            "LoRA Recycle − NN ≥ 2 at 5-shot",
            f"{five['LoRA Recycle']['mean'] - five['NN']['mean']:+.2f}",
            five["LoRA Recycle"]["mean"] - five["NN"]["mean"] >= 2,
        ),
        (
            "75% masked within 1 point of unmasked, step ≥ 2.5× faster",
            f"{rec75['mean'] - rec['mean']:+.2f}, {speed:.2f}×",
            rec75["mean"] - rec["mean"] >= -1 and speed >= 2.5,
        ),
    ]
    check = results["config"]["data"].get("check_style")
    if check and f"test-{check}-1shot" in ev:
        plain = ev[f"test-{check}-1shot"]["results"]
        gap = plain["LoRA Recycle"]["mean"] - plain["NN"]["mean"]
        rows.append((f"No damage: LoRA Recycle ≥ NN − 1 on Han {check} 1-shot", f"{gap:+.2f}", gap >= -1))
    agreement = s["invert"]["teacher_accuracy"]
    rows.append(("Teacher agreement ≥ 0.85", f"{agreement:.3f}", agreement >= 0.85))
    minutes = results["total_seconds"] / 60
    rows.append((f"Pipeline ≤ {TARGET_MINUTES} minutes", f"{minutes:.1f}", minutes <= TARGET_MINUTES))
    return rows


def targets_markdown(results: dict) -> str:
    """`targets` as a table (empty string when there are none)."""
    rows = targets(results)
    if not rows:
        return ""
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else 'missed'} |" for t, m, ok in rows]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Accuracy at each masking level (bars) and meta-training speed-up over unmasked (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, s = results["summaries"]["eval"], results["summaries"]
    levels = ["recycle", "recycle-25", "recycle-50", "recycle-75"]
    labels = ["0%", "25%", "50%", "75%"]
    methods = ["LoRA Recycle", "LoRA Recycle-25", "LoRA Recycle-50", "LoRA Recycle-75"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    width = 0.2
    cross = cross_name(results)
    for i, (key, title) in enumerate(
        [
            ("test-1shot", "Han 1-shot"),
            ("test-5shot", "Han 5-shot"),
            ("cross-1shot", f"{cross} 1-shot"),
            ("cross-5shot", f"{cross} 5-shot"),
        ]
    ):
        means = [ev[key]["results"][m]["mean"] for m in methods]
        cis = [ev[key]["results"][m]["ci95"] for m in methods]
        ax.bar([x + (i - 1.5) * width for x in range(4)], means, width, yerr=cis, capsize=2, label=title)
    nn = ev["test-1shot"]["results"]["NN"]["mean"]
    ax.axhline(nn, color="grey", linestyle=":", linewidth=1, label="NN, Han 1-shot")
    ax.set_xticks(range(4), labels)
    ax.set_xlabel("tokens masked in meta-training")
    ax.set_ylabel("5-way accuracy (%)")
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    speed = [s[f"meta-{lv}"]["step_seconds_median"] for lv in levels]
    ax2 = ax.twinx()
    ax2.plot(range(4), [speed[0] / v for v in speed], "k-o", label="meta-training speed-up")
    ax2.set_ylabel("meta-training speed-up vs 0% (×)")
    ax2.set_ylim(0, max(4.5, max(speed[0] / v for v in speed) * 1.1))
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", fontsize=7, ncol=3)
    ax.set_title("LoRA Recycle in miniature: accuracy and speed vs masking")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def source_description(data: dict) -> str:
    """What the pretraining split is, from the data stage's summary: ``"Hangul syllables rendered plain from 3 Debian
    fonts"``."""
    spec = data["spec"]
    script = spec.get("source_script", "han")
    names = {"han": "Han characters", "hangul": "Hangul syllables", "kana": "kana"}
    scripts = [script, *spec.get("source_extra", [])]
    fonts = max(len(data["fonts"][s]) for s in scripts)
    listed = " and ".join(names[s] for s in scripts)
    return f"{listed} rendered {spec.get('source_style', 'plain')} from {fonts} Debian fonts"


def prior_source(summaries: dict) -> str:
    """What the foundation and the BN prior were trained on, from the data and prior stages' summaries."""
    source = source_description(summaries["data"])
    copies = summaries["prior"].get("recoloured_copies", 0)
    if not copies:
        return f"foundation and BN prior: {source}"
    return (
        f"foundation: {source}; BN prior: the same images and {copies} copies of each in random ink and paper colours"
    )


def prior_card(summary: dict, steps: int, source: str, look: dict, command: str) -> str:
    """The model card of the shipped glyph BN prior, from the prior stage's summary (``train_acc``, ``classes``,
    ``recoloured_copies``), the `source_description` and the run's inversion settings (``bn_weight``, ``tv_weight``,
    ``two_colour``)."""
    copies = summary.get("recoloured_copies", 0)
    recoloured = (
        f", together with {copies} copies of each image in random ink and paper colours (either polarity, "
        "`reproduce.glyphs.recolour`)"
        if copies
        else ""
    )
    return (
        "---\nlibrary_name: timm\nlicense: apache-2.0\npipeline_tag: image-classification\ntags:\n- lora-recycle\n"
        "- bn-prior\n- timm\n- glyphs\n---\n\n"
        "# glyph-prior: the BN-statistics prior for mini-vit\n\n"
        "A small BatchNorm CNN (timm `resnet18` with one block per stage, `layers=[1, 1, 1, 1]`, 32 px input, "
        "mean = std = 0.5) whose BatchNorm running statistics are the image prior of LoRA inversion "
        "(`recycle.invert.BNPrior`). It is to `weights/mini-vit` what the paper's ImageNet ResNet-50 is to CLIP: "
        "a generic image prior trained on the foundation model's pretraining classes only"
        + (
            ", whose statistics cover coloured glyphs as ImageNet's cover the colours of the paper's downstream "
            "datasets.\n\n"
            if copies
            else ", on the images the backbone was pretrained on.\n\n"
        )
        + f"Trained by `reproduce.pipeline.stage_prior` on the {summary['classes']} pretraining classes of "
        f"`reproduce/` ({source}{recoloured}; never on zoo, validation or test classes), "
        f"{steps} steps, train accuracy {summary['train_acc']:.4f}. The classifier head is not used.\n\n"
        "Load it with `recycle.invert.load_bn_prior('weights/glyph-prior')`. The app's inversion tab uses it "
        "whenever the backbone is the shipped `mini-vit`, with the settings the run inverted its zoo with "
        f"(`inversion.json`: BN weight {look['bn_weight']:g}, total variation {look['tv_weight']:g}"
        + (
            f", two-colour images of luminance contrast at least {look['two_colour']:g}"
            if look.get("two_colour")
            else ""
        )
        + ").\n\n"
        f"Command: `{command}`.\n"
    )


def weights_readme(results: dict, meta_run: str, scores: dict, sizes_mb: dict[str, float]) -> str:
    """``weights/README.md``, from a run's results, the shipped run's name (``recycle``, ``recycle-75`` ...), the
    example tasks' scores (`ship.score_examples`) and the shipped folders' sizes."""
    s, ev = results["summaries"], results["summaries"]["eval"]
    shipped = method_name(meta_run)
    best = s[f"meta-{meta_run}"]

    def cell(key: str, method: str) -> str:
        r = ev[key]["results"][method]
        return f"{r['mean']:.2f} ± {r['ci95']:.2f}"

    total = scores["test_tasks_total"]
    tasks = sorted(scores["tasks"])
    objective = (
        "by contrast between random views, without labels"
        if s["pretrain"].get("objective") == "contrast"
        else "to classify their characters"
    )
    vit_line = (
        f"- `mini-vit/` ({sizes_mb['mini-vit']:.1f} MB): a timm ViT ({s['pretrain']['params'] / 1e6:.2f} M "
        f"parameters) pretrained on {source_description(s['data'])}, {objective};\n"
    )
    return (
        "# weights/\n\n"
        "The weights the app ships with, for when the default backbone (CLIP ViT-B/16 from the Hugging Face Hub) "
        f"cannot be loaded. All of it is written by the offline reproduction, `{pipeline_command(results)} --ship "
        "weights` (see [`reproduce/README.md`](../reproduce/README.md)); this file too.\n\n"
        + vit_line
        + f"- `mini-meta-lora/` ({sizes_mb['mini-meta-lora']:.2f} MB): its meta-LoRA, recycled data-free from a zoo of "
        f"{s['zoo']['loras']} LoRAs (`{shipped}`, step {best['best_step']}, the best on the validation classes"
        + (
            "; a variant beyond the paper: meta-training that starts from the zoo's LoRAs-average"
            if meta_run.endswith("-from-average")
            else ""
        )
        + "), "
        "with a model card and `recheck.json`, a seeded re-evaluation that CI repeats;\n"
        f"- `examples/`: {len(tasks)} example tasks for the few-shot tab ({', '.join(tasks)}), drawn by a fixed seeded "
        "rule (`reproduce.ship.write_examples`); their queries' file names carry their classes, so the app counts "
        "its correct answers. `examples/scores.json` has them;\n"
        f"- `example-lora/` ({sizes_mb['example-lora']:.2f} MB): one LoRA of the zoo with its head, offered by the "
        "inversion tab, so that inverting works offline and on a Space;\n"
        f"- `glyph-prior/` ({sizes_mb['glyph-prior']:.1f} MB): the BN-statistics prior for `mini-vit`, trained on "
        "the foundation's source (`glyph-prior/README.md`).\n\n"
        f"5-way 1-shot on held-out Han classes (600 episodes): {shipped} {cell('test-1shot', shipped)}, the backbone "
        f"alone (NN) {cell('test-1shot', 'NN')}; 5-shot {cell('test-5shot', shipped)} against "
        f"{cell('test-5shot', 'NN')}. On the {len([t for t in tasks if t[4:].isdigit()])} test-split example tasks "
        f"the app answers {total['meta-LoRA'][0]} of {total['meta-LoRA'][1]} queries correctly with the meta-LoRA "
        f"and {total['NN'][0]} of {total['NN'][1]} with the backbone alone.\n"
    )

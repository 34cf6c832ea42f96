"""The commands that make LoRAs and surrogates: ``pretune``, ``invert`` and ``meta-train``."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .. import distributed
from ..backbone import DEFAULT_BACKBONE, BackboneError
from ..provenance import require_fit
from ..runtime import resolve_precision
from .common import backbone_of, zoo_backbone

_logger = logging.getLogger("recycle")


def pretune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..backbone import load_backbone
    from ..lora import LoRAConfig
    from ..pretune import PretuneConfig
    from ..zoo import pretune_zoo

    config = PretuneConfig(
        num_loras=args.num_loras,
        way=args.way,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        flip=not args.no_flip,
        shift=args.shift,
        lora=LoRAConfig(rank=args.rank),
        seed=args.seed,
    )
    backbone = load_backbone(args.backbone, device=args.device)
    with tqdm(total=config.num_loras, desc="pre-tuning", unit="LoRA", disable=args.quiet) as bar:
        manifest = pretune_zoo(
            backbone, args.data, args.out, config, lambda done, total, entry: bar.update(done - bar.n)
        )
    accs = [
        e["holdout_acc"]
        for e in manifest["loras"]
        if isinstance(e.get("holdout_acc"), (int, float)) and e["holdout_acc"] == e["holdout_acc"]
    ]
    mean = f", mean held-out accuracy {sum(accs) / len(accs):.1%}" if accs else ""
    print(f"zoo {args.out}: {len(manifest['loras'])} LoRAs{mean}")
    return 0


def invert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..backbone import load_backbone
    from ..formats import load_lora
    from ..invert import InversionConfig, invert, load_bn_prior
    from ..pool import run_settings, write_run
    from ..tokens import PruningConfig

    prune = {} if args.prune in (["none"], ["0"]) else (args.prune or PruningConfig().schedule)
    config = InversionConfig(
        per_class=args.per_class,
        steps=args.steps,
        lr=args.lr,
        bn_weight=args.bn_weight,
        pruning=PruningConfig(prune, start=args.prune_start),
        batch_size=args.batch_size,
        seed=args.seed,
        two_colour=args.two_colour,
        diversity_weight=args.diversity_weight,
    )
    if args.zoo and args.classes:
        raise ValueError("--classes picks classes of one LoRA; with --zoo every class of every LoRA is inverted")
    if not args.zoo and distributed.world_size() > 1:
        raise ValueError(
            "invert --lora inverts one LoRA in one process; to use several ranks, invert a whole zoo with --zoo"
        )
    if args.backbone is None:
        args.backbone = backbone_of(args.lora) if args.lora else zoo_backbone(args.zoo)
    backbone = load_backbone(args.backbone, device=args.device)
    config = replace(config, bf16=resolve_precision(args.precision, backbone.device))
    adapter = None if args.zoo else load_lora(args.lora, backbone)
    if adapter is not None:
        require_fit(adapter, backbone, args.force, name=f"LoRA '{args.lora}'")
    else:
        from ..zoo import load_zoo

        for name, zoo_adapter in load_zoo(args.zoo, backbone):
            require_fit(zoo_adapter, backbone, args.force, name=f"the zoo's LoRA '{name}'")
    try:
        prior = None if args.bn_prior.lower() == "none" else load_bn_prior(args.bn_prior, backbone.device)
    except BackboneError as e:
        raise BackboneError(f"{e} Use --bn-prior none to invert without it.") from None
    settings = {"bn_prior": args.bn_prior, "backbone": args.backbone}
    if args.zoo:
        return _invert_zoo(args, backbone, config, prior, settings)
    n_images = (len(args.classes) if args.classes else adapter.num_classes) * config.per_class
    n_batches = -(-n_images // (config.batch_size or n_images or 1))  # a LoRA without a head: invert() says so
    with tqdm(total=config.steps * n_batches, desc="inverting", unit="step", disable=args.quiet) as bar:

        def progress(p):
            bar.update(1)
            bar.set_postfix(loss=f"{p.loss:.3f}", acc=f"{p.accuracy:.2f}", pruning=p.pruning, refresh=False)

        result = invert(backbone, adapter, config, args.classes, prior, progress=progress)
    run = write_run(
        args.out,
        result,
        adapter,
        args.lora,
        run_settings(config, **settings),
        tuple(backbone.model.patch_embed.grid_size),
    )
    acc = (result.logits.argmax(-1) == result.labels).float().mean().item()
    print(f"wrote {result.images.shape[0]} images to {run} (teacher accuracy {acc:.1%})")
    return 0


def _invert_zoo(args: argparse.Namespace, backbone, config, prior, settings: dict) -> int:
    """``invert --zoo``: every LoRA of the zoo into the pool, dealt to the ranks under torchrun."""
    from tqdm import tqdm

    from ..zoo import invert_zoo

    with tqdm(desc="inverting the zoo", unit="step", disable=args.quiet) as bar:

        def progress(name, p):
            bar.update(1)
            bar.set_postfix(lora=name, loss=f"{p.loss:.3f}", acc=f"{p.accuracy:.2f}", refresh=False)

        runs = invert_zoo(backbone, args.zoo, args.out, config, prior, settings, progress=progress)
    made = [r for r in runs if r[2] is not None]
    print(
        f"{args.out}: inverted {len(made)} LoRAs, {len(runs) - len(made)} already done"
        + (f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.world_size() > 1 else "")
    )
    return 0


def meta_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..backbone import load_backbone
    from ..evaluate import EvalConfig, make_validator
    from ..card import write_model_card
    from ..lora import LoRAConfig
    from ..episodes import PoolEpisodes, ZooEpisodes
    from ..meta import MetaConfig, meta_train
    from ..pool import Pool

    config = MetaConfig(
        steps=args.steps,
        way=args.way,
        shot=args.shot,
        query=args.query,
        masked=args.masked,
        cross_fraction=args.cross_fraction,
        teacher_temperature=args.teacher_temperature,
        lr=args.lr,
        lora=LoRAConfig(rank=args.rank),
        checkpoint_every=args.checkpoint_every,
        val_every=args.val_every if args.val else 0,
        val_episodes=args.val_episodes,
        seed=args.seed,
        episode_batch=args.episode_batch,
    )
    if args.backbone is None:
        args.backbone = zoo_backbone(args.zoo) if args.zoo else DEFAULT_BACKBONE
    out = Path(args.out)
    if args.resume and not (out / "checkpoint.safetensors").is_file() and not (out / "log.jsonl").is_file():
        raise ValueError(
            f"--resume: nothing to resume in {out}: it holds no checkpoint.safetensors and no log.jsonl "
            "(no run was started there); check --out, or leave out --resume to start a new run"
        )
    backbone = load_backbone(args.backbone, device=args.device)
    config = replace(config, bf16=resolve_precision(args.precision, backbone.device))
    if args.pool:
        source = PoolEpisodes(Pool(args.pool), config.spec, config.masked)
        origin = {"pool": args.pool}
    else:
        from ..invert import InversionConfig, load_bn_prior
        from ..zoo import load_zoo
        from ..tokens import PruningConfig

        adapters = [a for _, a in load_zoo(args.zoo, backbone)]
        prune = PruningConfig({-1: args.mask_ratio} if args.masked else {})
        prior = None if args.bn_prior.lower() == "none" else load_bn_prior(args.bn_prior, backbone.device)
        source = ZooEpisodes(
            backbone,
            adapters,
            config.spec,
            config.masked,
            InversionConfig(steps=args.invert_steps, pruning=prune, bf16=config.bf16),
            prior,
        )
        origin = {"zoo": args.zoo, "online_inversion_steps": args.invert_steps}
    validate = None
    if args.val:
        validate = make_validator(
            backbone,
            args.val,
            EvalConfig(config.way, config.shot, config.query, config.val_episodes, seed=args.seed, bf16=config.bf16),
        )
    command = "python -m recycle " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0] else None
    with tqdm(total=config.steps, desc="meta-training", unit="step", disable=args.quiet) as bar:

        def progress(record: dict) -> None:
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.3f}", kind=record["kind"], refresh=False)

        result = meta_train(
            backbone,
            source,
            config,
            args.out,
            resume=args.resume,
            validate=validate,
            progress=progress,
            info={**origin, "backbone": args.backbone, "command": command},
        )
    if distributed.is_main():
        write_model_card(Path(args.out) / "meta-lora", result.adapter, command=command)
    tail = result.losses[-10:]
    msg = f"meta-LoRA written to {Path(args.out) / 'meta-lora'}"
    if tail:
        msg += f" (mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"
    if result.best_step == 0:
        msg += (
            f"; no step beat the bare backbone on validation ({result.best_val:.1%}), so the meta-LoRA is the identity"
        )
    elif result.best_val is not None:
        msg += f"; best validation accuracy {result.best_val:.1%} at step {result.best_step}"
        if result.baseline_val is not None:
            msg += f" (bare backbone {result.baseline_val:.1%})"
    print(msg)
    return 0

"""Meta-training one meta-LoRA on surrogate episodes (LoRA Recycle §4.2–4.3, Alg. 1).

Each step draws an N-way K-shot episode of surrogate images, embeds support and queries with the backbone plus the
trainable meta-LoRA, builds prototypes and scores queries by −‖q − c‖₂ (no inner-loop tuning). The loss is
``KL(teacher ‖ student)`` on the queries for single-LoRA episodes (the teacher's logits were stored in the pool at
inversion time) and cross-entropy for cross-LoRA episodes (classes from different LoRAs, "cross-task
interpolation"). Masked pools are fed as their kept tokens only. Adam at 1e-3 on a repeating cycle of 25 warm-up
and 75 cosine steps.

The teacher LoRAs never touch the student: pool episodes carry the teachers' logits as data, and online inversion
(`ZooEpisodes`) runs the teachers on a separate copy of the backbone. (The official code loads each teacher into the
model that holds the meta-LoRA, so its meta-LoRA never trains.)

Checkpoints (`recycle.checkpoint`) hold the LoRA and Adam state, the step and every RNG state, so ``resume=True``
continues exactly as an uninterrupted run would. The episode sources are in `recycle.episodes`.

``episode_batch`` B > 1 averages the loss of B episodes per optimiser step. Each of them draws its randomness from
``(seed, step, episode index)`` alone, so under ``torchrun`` with N ranks each rank computes B/N of them, the LoRA
gradients are summed over ranks (`recycle.distributed`), and the step equals one process's step over all B episodes.
Rank 0 alone writes the checkpoint, the log and the result. With B = 1 the episodes come from one stream of random
numbers, as before batches existed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from . import distributed
from .backbone import Backbone
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, truncate_log
from .episodes import EpisodeSource, PoolEpisode, PoolTeachers
from .fewshot import prototype_logits
from .adapter import LoRAAdapter
from .formats import save_adapter
from .io import atomic_write_bytes
from .meta_config import MetaConfig, cyclic_lr
from .lora import (
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    lora_suspended,
    remove_lora,
)
from .runtime import mixed_precision
from .tokens import embed_kept
from .views import ViewConfig, kept_pixels, random_views

__all__ = ["MetaConfig", "cyclic_lr", "flip_kept", "episode_loss", "meta_train", "MetaResult"]

_logger = logging.getLogger(__name__)
LOG = "log.jsonl"


def flip_kept(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Kept patch indices of a horizontally flipped image (column c -> gw − 1 − c), ascending."""
    gw = grid[1]
    return ((kept // gw) * gw + (gw - 1 - kept % gw)).sort().values


def _embed(
    backbone: Backbone, images: torch.Tensor, kept: Optional[list[torch.Tensor]], flips: torch.Tensor
) -> torch.Tensor:
    """Normalise, flip the marked images (and their kept indices), and embed: ``(n, 3, H, W)`` -> ``(n, D)``."""
    device = backbone.device
    x = images.to(device)
    x = backbone.normalize(torch.where(flips.view(-1, 1, 1, 1).to(device), x.flip(3), x))
    if kept is None:
        return backbone.embed(x)
    grid = tuple(backbone.model.patch_embed.grid_size)
    rows = [flip_kept(k, grid) if f else k for k, f in zip(kept, flips.tolist())]
    return embed_kept(backbone, x, rows)


def episode_loss(
    backbone: Backbone,
    episode: PoolEpisode,
    distance: str = "l2",
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
    teacher_temperature: float = 1.0,
    bf16: bool = False,
    views: Optional[ViewConfig] = None,
    teachers: Optional[PoolTeachers] = None,
) -> tuple[torch.Tensor, float]:
    """ProtoNet loss of the LoRA-equipped `backbone` on one episode, and its query accuracy.

    KL(softmax(teacher / T) ‖ student) on the queries when the episode carries teacher logits (single-LoRA), else
    cross-entropy. With `views`, every support and query image is replaced by a random view of it
    (`recycle.views.random_views`; masked images keep their kept patches in place), and with `teachers` the KL target
    is the source LoRA's output on the queries' views. With `bf16`, the backbone runs under bf16 autocast; the
    embeddings, prototypes and loss are float32.
    """
    n_s, n_q = episode.support.shape[0], episode.query.shape[0]
    flips = (torch.rand(n_s + n_q, generator=generator) < 0.5) if flip else torch.zeros(n_s + n_q, dtype=torch.bool)
    images = torch.cat([episode.support, episode.query])
    kept = None if episode.support_kept is None else list(episode.support_kept) + list(episode.query_kept)
    if views is not None:
        valid = None
        if kept is not None:
            valid = kept_pixels(kept, tuple(backbone.model.patch_embed.grid_size), tuple(images.shape[-2:]))
        images = random_views(images, views, generator, valid)
    teacher_logits = episode.teacher_logits
    if teachers is not None and teacher_logits is not None:
        teacher_logits = teachers.logits(episode, images[n_s:])
    with mixed_precision(backbone.model, backbone.device, bf16):
        emb = _embed(backbone, images, kept, flips)
    emb = emb.float()
    way = int(episode.support_labels.max()) + 1
    device = emb.device
    logits = prototype_logits(emb[:n_s], episode.support_labels.to(device), emb[n_s:], distance, way)
    if teacher_logits is not None:
        target = (teacher_logits.to(device) / teacher_temperature).softmax(-1)
        loss = F.kl_div(logits.log_softmax(-1), target, reduction="batchmean")
    else:
        loss = F.cross_entropy(logits, episode.query_labels.to(device))
    acc = (logits.argmax(-1).cpu() == episode.query_labels).float().mean().item()
    return loss, acc


@dataclass
class MetaResult:
    adapter: LoRAAdapter  # the exported meta-LoRA (best on validation if validated, else the last)
    steps_done: int
    losses: list[float]
    best_val: Optional[float] = None
    best_step: Optional[int] = None  # 0: the start validated best, and the exported meta-LoRA is the start (identity)
    baseline_val: Optional[float] = None  # validation accuracy at step 0: the bare backbone, or the `init` LoRA


def _validate(backbone: Backbone, config: MetaConfig, validate: Callable[[LoRAAdapter], float]) -> float:
    """Score the current meta-LoRA on the validation split (in eval mode, with the LoRA suspended meanwhile)."""
    was_training = backbone.model.training
    backbone.model.eval()
    adapter = LoRAAdapter.from_model(backbone.model, config.lora)
    with lora_suspended(backbone.model):
        val = validate(adapter)
    backbone.model.train(was_training)
    return val


@contextlib.contextmanager
def _episode_rngs(
    config: MetaConfig, step: int, index: int, py: random.Random, gen: torch.Generator, device: torch.device
):
    """The random streams of episode `index` of `step`: the run's own streams when ``episode_batch == 1``; otherwise
    fresh ones seeded by ``(seed, step, index)``, with the global torch RNG (LoRA dropout) seeded the same way and
    restored afterwards, so an episode is the same whichever rank computes it."""
    if config.episode_batch == 1:
        yield py, gen
        return
    seed = distributed.derive_seed(config.seed, step, index)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield random.Random(seed), torch.Generator().manual_seed(seed)


def _batch_gradients(
    backbone: Backbone,
    source: EpisodeSource,
    config: MetaConfig,
    step: int,
    py: random.Random,
    gen: torch.Generator,
    teachers: Optional[PoolTeachers] = None,
) -> list[tuple[float, float, str]]:
    """Add to the LoRA gradients the gradient of (sum of losses) / episode_batch over this rank's episodes of `step`;
    returns ``(loss, accuracy, kind)`` of each (a non-finite loss is returned, not back-propagated)."""
    out = []
    for index in distributed.shard_indices(config.episode_batch):
        with _episode_rngs(config, step, index, py, gen, backbone.device) as (rng, episode_gen):
            kind = "cross" if rng.random() < config.cross_fraction else "single"
            episode = source.next(kind, rng)
            loss, acc = episode_loss(
                backbone,
                episode,
                config.distance,
                config.flip,
                episode_gen,
                config.teacher_temperature,
                config.bf16,
                config.views,
                teachers,
            )
            if torch.isfinite(loss):
                (loss / config.episode_batch if config.episode_batch > 1 else loss).backward()
        out.append((loss.item(), acc, episode.kind))
    return out


def meta_train(
    backbone: Backbone,
    source: EpisodeSource,
    config: MetaConfig,
    out: Union[str, Path],
    resume: bool = False,
    validate: Optional[Callable[[LoRAAdapter], float]] = None,
    progress: Optional[Callable[[dict], None]] = None,
    info: Optional[dict] = None,
    init: Optional[LoRAAdapter] = None,
    teachers: Optional[PoolTeachers] = None,
) -> MetaResult:
    """Train one meta-LoRA on `backbone` with episodes from `source`; write checkpoints, a JSONL log and the result.

    Args:
        backbone: frozen backbone; the meta-LoRA is injected for the run and removed afterwards.
        source: `PoolEpisodes` or `ZooEpisodes`.
        config: settings.
        out: output folder: ``checkpoint.safetensors``, ``log.jsonl``, ``meta-lora/`` (the exported LoRA).
        resume: continue from ``out/checkpoint.safetensors`` exactly where it stopped (refused if the checkpoint was
            made with other settings; only ``checkpoint_every`` may change and ``steps`` may grow). Without a
            checkpoint it logs a warning and starts from step 0 (the command line refuses ``--resume`` on a folder
            that holds neither a checkpoint nor a log).
        validate: optional ``adapter -> accuracy`` on a real validation split, run before the first step (the
            bare backbone: the meta-LoRA starts as the identity) and every ``config.val_every`` steps; the best
            adapter is exported. If no step beats the bare backbone, the exported meta-LoRA is the identity and
            ``MetaResult.best_step`` is 0. Never pass the test split.
        progress: called with each step's log record.
        info: provenance recorded in the exported LoRA.
        init: start the meta-LoRA from this adapter (for example `recycle.adapter.average_loras` of the zoo, a
            variant beyond the paper) instead of the identity; ``config.lora`` must be its configuration. Step 0's
            validation then scores `init`, so model selection can still choose "no change" from it.
        teachers: the pool's source LoRAs, needed with ``config.teacher_on_views``: they score each single-LoRA
            episode's query views.

    Under torchrun every rank calls this with the same arguments; `out` must be on a filesystem all ranks share.
    """
    world, main = distributed.world_size(), distributed.is_main()
    if config.episode_batch % world:
        raise ValueError(
            f"episode_batch={config.episode_batch} cannot be split evenly over {world} ranks; use a multiple of {world}"
        )
    if config.teacher_on_views and teachers is None:
        raise ValueError("teacher_on_views: meta_train needs the pool's teachers (recycle.episodes.PoolTeachers)")
    if init is not None and init.config != config.lora:
        raise ValueError(
            f"init: the starting LoRA's configuration ({init.config}) differs from config.lora ({config.lora}); "
            "meta-train with lora=init.config"
        )
    out = Path(out)
    ckpt, log_path = out / CHECKPOINT, out / LOG
    if resume and not ckpt.is_file():
        _logger.warning(
            "resume: %s holds no %s (%s), so training starts from step 0",
            out,
            CHECKPOINT,
            "the run stopped before its first checkpoint" if log_path.is_file() else "no run was started there",
        )
    out.mkdir(parents=True, exist_ok=True)
    py = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    inject_lora(backbone.model, config.lora)
    try:
        if init is not None:
            load_lora_state_dict(backbone.model, init.state)
        backbone.model.to(backbone.device)
        params = lora_parameters(backbone.model)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.lr)
        start, extra = 0, {"best_val": None, "best_step": None, "baseline_val": None}
        if resume and ckpt.is_file():
            start, loaded = load_checkpoint(ckpt, backbone, opt, py, gen, config)
            extra.update(loaded)
            _logger.info("resumed from step %d", start)
        if main and start > 0:  # drop what a killed run logged after its last checkpoint
            truncate_log(log_path, start)
        elif main and log_path.exists():  # a fresh start, or a resume killed before its first checkpoint
            log_path.unlink()
        starts = distributed.all_gather_object(start)
        if len(set(starts)) > 1:
            raise ValueError(
                f"the ranks found different checkpoints in {out} (steps {starts}); the output folder "
                "must be on a filesystem that every rank shares"
            )
        best_state = None
        if extra.get("best_step") is not None and (out / "best.safetensors").is_file():
            from safetensors.torch import load_file

            best_state = load_file(str(out / "best.safetensors"))
        losses = []
        backbone.model.train()
        t0 = time.perf_counter()
        with log_path.open("a", encoding="utf-8") if main else open(os.devnull, "w") as log:  # rank 0 logs
            if validate is not None and config.val_every and start == 0:
                # Step 0 is a candidate too: model selection must be able to choose "no change".
                val = _validate(backbone, config, validate)
                extra.update(best_val=val, best_step=0, baseline_val=val)
                best_state = lora_state_dict(backbone.model)
                if main:
                    atomic_write_bytes(out / "best.safetensors", safetensors_bytes(best_state))
                log.write(json.dumps({"step": 0, "val_acc": round(val, 4)}) + "\n")
                log.flush()
            for step in range(start, config.steps):
                lr = cyclic_lr(step, config.lr, config.min_lr, config.warmup, config.cycle)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                episodes = distributed.gather_ordered(
                    _batch_gradients(
                        backbone, source, config, step, py, gen, teachers if config.teacher_on_views else None
                    ),
                    config.episode_batch,
                )
                loss = sum(e[0] for e in episodes) / len(episodes)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"meta-training loss became {loss} at step {step}; lower the learning rate or check the pool"
                    )
                if world > 1:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    distributed.all_reduce_sum_([p.grad for p in params])
                opt.step()
                losses.append(loss)
                kinds = sorted({e[2] for e in episodes})
                record = {
                    "step": step + 1,
                    "loss": round(loss, 6),
                    "acc": round(sum(e[1] for e in episodes) / len(episodes), 4),
                    "kind": kinds[0] if len(kinds) == 1 else "mixed",
                    "lr": lr,
                    "time": round(time.perf_counter() - t0, 3),
                }
                if config.episode_batch > 1:
                    record["episodes"] = config.episode_batch
                done = step + 1
                if validate is not None and config.val_every and (done % config.val_every == 0 or done == config.steps):
                    val = _validate(backbone, config, validate)
                    record["val_acc"] = round(val, 4)
                    if extra["best_val"] is None or val > extra["best_val"]:
                        extra["best_val"], extra["best_step"] = val, done
                        best_state = lora_state_dict(backbone.model)
                        if main:
                            atomic_write_bytes(out / "best.safetensors", safetensors_bytes(best_state))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if progress is not None:
                    progress(record)
                if main and (done % config.checkpoint_every == 0 or done == config.steps):
                    save_checkpoint(ckpt, backbone, opt, done, config, py, gen, extra)
        backbone.model.eval()
        state = best_state if best_state is not None else lora_state_dict(backbone.model)
        if extra["best_step"] == 0:
            _logger.warning(
                "no meta-training step beat the start on validation (%.4f at step 0): the exported meta-LoRA is %s",
                extra["best_val"],
                "the identity" if init is None else "the starting LoRA",
            )
        adapter = LoRAAdapter(
            config.lora,
            state,
            backbone.name,
            info={
                **(info or {}),
                "meta_training": asdict(config),
                "steps": config.steps,
                "best_val": extra["best_val"],
                "best_step": extra["best_step"],
                "baseline_val": extra["baseline_val"],
                **({"init": dict(init.info)} if init is not None else {}),
                **({"resumed": extra["resumed"]} if extra.get("resumed") else {}),
            },
        )
        if main:
            save_adapter(adapter, out / "meta-lora")
    finally:
        remove_lora(backbone.model)
        backbone.model.eval()
    return MetaResult(adapter, config.steps, losses, extra["best_val"], extra["best_step"], extra.get("baseline_val"))

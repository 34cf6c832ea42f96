import os
import subprocess
import sys

import pytest
import torch

from recycle.evaluate import EvalConfig
from recycle.invert import InversionConfig
from recycle.lora import lora_parameters, remove_lora
from recycle.meta import MetaConfig, episode_loss
from recycle.episodes import PoolEpisode
from recycle.runtime import mixed_precision, native_bf16, resolve_precision
from recycle.tokens import keep_mask, mask_images
from tests.helpers import colour_task, train_tiny_lora

# bf16 keeps 8 significant bits (relative rounding 2^-9); the embeddings come out about 0.3% off. ProtoNet logits are
# distances between embeddings, so the error of the loss and the gradients grows as the embeddings crowd together:
# with the classes spread as a trained model spreads them (pairwise distance ~ the norm), the LoRA gradients
# measured cosine > 0.9999 and a relative error < 1% against fp32. A random tiny ViT maps every image to nearly
# the same embedding (distances ~ 1-7% of the norm), and the relative error rises to 3-14%.
GRAD_MIN_COSINE = 0.999
GRAD_MAX_REL_ERROR = 0.02


def test_precision_resolution():
    assert resolve_precision("auto", "cpu") is native_bf16("cpu")
    assert resolve_precision("fp32", "cpu") is False and resolve_precision("bf16", "cpu") is True
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    for make in (MetaConfig, InversionConfig, EvalConfig):
        assert make(bf16=True).bf16 is True
        with pytest.raises(ValueError, match="bf16='false'"):
            make(bf16="false")  # a truthy string must not switch bf16 on


def test_mixed_precision_switches_attention_and_restores_it(tiny_clip):
    attns = [b.attn for b in tiny_clip.model.blocks]
    assert all(a.fused_attn for a in attns)
    with mixed_precision(tiny_clip.model, "cpu", False):
        assert all(a.fused_attn for a in attns) and not torch.is_autocast_enabled("cpu")
    with pytest.raises(RuntimeError, match="boom"):
        with mixed_precision(tiny_clip.model, "cpu", True):
            assert not any(a.fused_attn for a in attns) and torch.is_autocast_enabled("cpu")
            assert tiny_clip.embed(torch.rand(2, 3, 32, 32)).dtype == torch.bfloat16  # the projection head
            raise RuntimeError("boom")
    assert all(a.fused_attn for a in attns) and not torch.is_autocast_enabled("cpu")


@pytest.fixture()
def trained(tiny_clip):
    """A tiny CLIP with a LoRA tuned on three colour classes, and the episode's images (1 shot, 3 queries)."""
    images, labels = colour_task(3, 4)
    adapter = train_tiny_lora(tiny_clip, images, labels, steps=30)
    x = tiny_clip.preprocess(images)
    raw = x * torch.tensor(tiny_clip.std).view(1, 3, 1, 1) + torch.tensor(tiny_clip.mean).view(1, 3, 1, 1)
    return adapter, raw, torch.tensor(labels), x


@pytest.mark.parametrize("masked", [False, True], ids=["all-tokens", "kept-tokens"])
def test_bf16_lora_gradients_match_fp32(tiny_clip, trained, masked):
    """bf16 autocast changes the backbone's arithmetic only: the loss is fp32 and the meta-LoRA's gradients match
    fp32 within the tolerances above (the LoRA starts from a tuned one, so A and B both get gradients)."""
    adapter, raw, labels, x = trained
    gen = torch.Generator().manual_seed(0)
    s_idx, q_idx = [0, 4, 8], [1, 2, 3, 5, 6, 7, 9, 10, 11]
    kept = None
    if masked:
        kept = torch.rand(12, 16, generator=gen).argsort(1)[:, :8].sort(1).values
        raw = mask_images(raw, keep_mask(kept, (4, 4)))
    episode = PoolEpisode(
        raw[s_idx],
        labels[s_idx],
        raw[q_idx],
        labels[q_idx],
        "single",
        [],
        torch.randn(9, 3, generator=gen) * 3,
        None if kept is None else list(kept[s_idx]),
        None if kept is None else list(kept[q_idx]),
    )
    adapter.inject(tiny_clip.model)
    try:
        with torch.no_grad():
            emb = tiny_clip.embed(x)
        assert (torch.pdist(emb) / emb.norm(dim=1).mean()).median() > 0.3  # the tolerances' premise
        params = lora_parameters(tiny_clip.model)
        for p in params:
            p.requires_grad_(True)
        grads, losses = {}, {}
        for bf16 in (False, True):
            loss, _ = episode_loss(tiny_clip, episode, flip=False, bf16=bf16)
            assert loss.dtype == torch.float32
            grads[bf16] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
            losses[bf16] = loss.item()
        assert all(p.dtype == torch.float32 for p in params)
        assert all(b.attn.fused_attn for b in tiny_clip.model.blocks)
    finally:
        remove_lora(tiny_clip.model)
    g32, g16 = grads[False], grads[True]
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    rel = ((g16 - g32).norm() / g32.norm()).item()
    assert g32.norm() > 0 and cosine > GRAD_MIN_COSINE and rel < GRAD_MAX_REL_ERROR, (cosine, rel)
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_tune_allocator_stops_the_page_faults_of_large_allocations():
    """In a fresh process: freeing and re-allocating 64 MiB page-faults every time with glibc's defaults (it is
    above the mmap threshold); once tuned, the heap keeps the memory, and after a warm-up (the heap grows while
    its holes are too small for an aligned request) it faults no more. RECYCLE_MALLOC=default opts out."""
    script = (
        "import resource, sys, torch\n"
        "from recycle.runtime import tune_allocator\n"
        "settings = tune_allocator() if sys.argv[1] == 'tune' else {}\n"
        "for _ in range(20):\n"
        "    torch.empty(16 << 20).fill_(1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    torch.empty(16 << 20).fill_(1)\n"
        "print(sorted(settings), '|', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def run(mode: str, malloc: str = "") -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "RECYCLE_MALLOC": malloc},
        ).stdout
        settings, faults = out.split("|")
        return settings.strip(), int(faults)

    default_settings, default_faults = run("default")
    tuned_settings, tuned_faults = run("tune")
    opted_out_settings, opted_out_faults = run("tune", "default")
    assert default_settings == opted_out_settings == "[]"
    assert tuned_settings == "['M_MMAP_MAX', 'M_TRIM_THRESHOLD']"
    assert default_faults > 5 * 15000 and opted_out_faults > 5 * 15000  # 64 MiB = 16384 pages, each time afresh
    assert tuned_faults < 1000


def test_tune_allocator_refuses_a_bad_setting_even_after_tuning(monkeypatch):
    """A process that already tuned the allocator still refuses a bad ``RECYCLE_MALLOC`` on the next call."""
    import recycle.runtime as runtime

    monkeypatch.setattr(runtime, "_allocator_settings", {"M_MMAP_MAX": 0})
    monkeypatch.setenv("RECYCLE_MALLOC", "off")
    with pytest.raises(ValueError, match="RECYCLE_MALLOC='off' is not a setting"):
        runtime.tune_allocator()
    monkeypatch.setenv("RECYCLE_MALLOC", "tuned")
    assert runtime.tune_allocator() == {"M_MMAP_MAX": 0}

"""int8 inference: a LoRA baked in exactly, a quantised private copy per (backbone, LoRA), the precision choice."""

import pytest
import torch
import torch.nn.functional as F

from recycle import quantize
from recycle.backbone import Backbone
from recycle.evaluate import EvalConfig
from recycle.fewshot import FewShotClassifier
from recycle.lora import LoRALinear, bake_lora, lora_layers
from recycle.runtime import int8_supported, resolve_inference_precision
from tests.helpers import colour_task, train_tiny_lora

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="this CPU has no int8 kernels")


@pytest.fixture()
def task_and_lora(tiny_clip):
    images, labels = colour_task(n_classes=3, per_class=6)
    return images, labels, train_tiny_lora(tiny_clip, images, labels, steps=20)


def test_bake_lora_equals_the_attached_lora_and_leaves_plain_linears(tiny_clip, task_and_lora):
    images, _, lora = task_and_lora
    x = tiny_clip.preprocess(images[:4])
    import copy

    with torch.no_grad(), lora.attached(tiny_clip):
        expected = tiny_clip.embed(x)
        private = copy.deepcopy(tiny_clip.model)
    baked = bake_lora(private)
    assert baked and not list(lora_layers(private))
    assert not any(isinstance(m, LoRALinear) for m in private.modules())
    with torch.no_grad():
        assert torch.allclose(tiny_clip.embed(x, model=private), expected, atol=1e-5)
        assert not torch.allclose(tiny_clip.embed(x), expected, atol=1e-3)  # the shared backbone stayed bare


@needs_int8
def test_int8_copies_keep_the_embeddings_are_cached_and_leave_the_backbone_alone(tiny_clip, task_and_lora):
    images, _, lora = task_and_lora
    x = tiny_clip.preprocess(images)
    before = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    quantize.clear_int8_cache()
    q_lora, q_bare = quantize.int8_model(tiny_clip, lora), quantize.int8_model(tiny_clip)
    assert q_lora is quantize.int8_model(tiny_clip, lora) and q_lora is not q_bare  # one copy per LoRA
    linears = [m for m in q_lora.modules() if type(m).__name__ == "Linear" and m.__module__.startswith("torch.nn")]
    assert not linears  # every Linear is quantised
    with torch.no_grad(), lora.attached(tiny_clip):
        reference = tiny_clip.embed(x)
    with torch.no_grad():
        assert F.cosine_similarity(tiny_clip.embed(x, model=q_lora), reference).min() > 0.98
        bare = tiny_clip.embed(x)
        assert F.cosine_similarity(tiny_clip.embed(x, model=q_bare), bare).min() > 0.98
    after = tiny_clip.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not list(lora_layers(tiny_clip.model))


@needs_int8
def test_the_int8_classifier_predicts_as_fp32_does(tiny_clip, task_and_lora):
    images, labels, lora = task_and_lora
    support, queries = images[::3], [im for i, im in enumerate(images) if i % 3]
    fp32 = FewShotClassifier(tiny_clip, lora).fit(support, labels[::3])
    int8 = FewShotClassifier(tiny_clip, lora, int8=True).fit(support, labels[::3])
    assert int8.predict(queries) == fp32.predict(queries)
    assert torch.allclose(int8.predict_proba(queries), fp32.predict_proba(queries), atol=0.05)
    assert int8._lora_key != fp32._lora_key  # embeddings of the two precisions are never mixed in a cache


def test_bad_int8_combinations_are_refused(tiny_clip):
    with pytest.raises(ValueError, match="one of bf16 and int8"):
        FewShotClassifier(tiny_clip, bf16=True, int8=True)
    with pytest.raises(ValueError, match="one of bf16 and int8"):
        EvalConfig(bf16=True, int8=True)
    with pytest.raises(ValueError, match="int8='yes'"):
        EvalConfig(int8="yes")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_inference_precision("int8", "cuda")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        resolve_inference_precision("int4", "cpu")
    assert resolve_inference_precision("fp32", "cpu") == ("fp32", "as asked")
    choice, why = resolve_inference_precision("auto", "cpu")
    assert choice == ("int8" if int8_supported() else choice) and why.startswith("auto:")


def test_calibration_keeps_fp32_when_it_is_instant_or_nothing_keeps_the_embeddings(tiny_clip, monkeypatch):
    choice, why = quantize.choose_precision(tiny_clip)  # a tiny model: nothing to gain
    assert choice == "fp32" and "instant" in why
    monkeypatch.setattr(quantize, "INSTANT_S", 0.0)
    monkeypatch.setattr(quantize, "MIN_COSINE", 1.01)  # no other precision can keep the embeddings this well
    assert quantize.choose_precision(tiny_clip) == ("fp32", "auto: nothing beat fp32 here with embeddings kept")
    monkeypatch.setattr(quantize, "MIN_COSINE", 0.0)
    monkeypatch.setattr(quantize, "MIN_SPEEDUP", 0.0)  # any candidate that is faster than fp32 wins
    choice, why = quantize.choose_precision(tiny_clip)
    assert choice in ("fp32", "bf16", "int8") and why.startswith("auto:")


@needs_int8
def test_int8_refuses_weights_too_large_for_its_scales_and_calibration_skips_it(tiny_clip, monkeypatch):
    """Huge but finite weights (a LoRA's B x 1e30, a backbone at 3e38) would overflow int8's run-time scales: the
    int8 copy is refused with the reason, the classifier embeds in fp32 instead, and `auto` never picks it."""
    import copy

    from recycle.quantize import MAX_INT8_MAGNITUDE, choose_precision, quantize_int8

    model = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = 3e38
    with pytest.raises(ValueError, match=r"weights up to 3e\+38 in magnitude \(int8: at most 1e\+06\)"):
        quantize_int8(model)
    assert MAX_INT8_MAGNITUDE == 1e6
    huge = Backbone(model, "huge")
    assert FewShotClassifier(huge, int8=True)._int8_model() is None  # the fp32 path then reports what it finds
    monkeypatch.setattr("recycle.quantize.INSTANT_S", 0.0)
    assert choose_precision(huge)[0] in ("fp32", "bf16")

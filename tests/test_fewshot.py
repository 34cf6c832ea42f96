import pytest
import torch

from recycle.fewshot import FewShotClassifier, compute_prototypes, pairwise_distances, prototype_logits
from recycle.formats import LoRAAdapter
from recycle.lora import LoRAConfig, inject_lora, lora_layers, lora_parameters, remove_lora
from tests.helpers import make_image


def test_prototypes_golden_values_with_unbalanced_shots():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 4.0], [1.0, 1.0], [1.0, 3.0], [1.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    protos = compute_prototypes(feats, labels)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [4.0, 4.0], [1.0, 3.0]]))
    with pytest.raises(ValueError, match="no support"):
        compute_prototypes(feats, labels, num_classes=4)


def test_distances():
    q = torch.tensor([[3.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-3.0, -4.0]])
    assert torch.allclose(pairwise_distances(q, c, "l2"), torch.tensor([[5.0, 4.0, 10.0]]))
    assert torch.allclose(pairwise_distances(q, c, "sqeuclidean"), torch.tensor([[25.0, 16.0, 100.0]]))
    cos = pairwise_distances(q, c[1:], "cosine")
    assert torch.allclose(cos, torch.tensor([[1 - 0.6, 2.0]]))
    logits = prototype_logits(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1]), q)
    assert torch.allclose(logits, -torch.tensor([[5.0, 4.0]]))


def _task(n_classes=3, shots=(1, 2, 3)):
    images, labels = [], []
    for c in range(n_classes):
        for s in range(shots[c]):
            images.append(make_image(100 * c + s))
            labels.append(f"class {c}")
    return images, labels


def test_probabilities_are_softmax_of_negative_l2(tiny_clip):
    images, labels = _task()
    queries = [make_image(999), make_image(998)]
    clf = FewShotClassifier(tiny_clip).fit(images, labels)
    assert clf.classes == ["class 0", "class 1", "class 2"]
    with torch.no_grad():
        emb = tiny_clip.embed(tiny_clip.preprocess(images))
        q = tiny_clip.embed(tiny_clip.preprocess(queries))
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    protos = torch.stack([emb[y == k].mean(0) for k in range(3)])
    expected = torch.softmax(-torch.cdist(q, protos), dim=-1)
    got = clf.predict_proba(queries)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(2))
    assert clf.predict(queries) == [clf.classes[i] for i in expected.argmax(-1)]


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_other_distances(tiny_clip, distance):
    """The probabilities are the softmax of the negative distance named, computed here from the embeddings."""
    images, labels = _task()
    queries = [make_image(999), make_image(998)]
    p = FewShotClassifier(tiny_clip, distance=distance).fit(images, labels).predict_proba(queries)
    with torch.no_grad():
        emb = tiny_clip.embed(tiny_clip.preprocess(images))
        q = tiny_clip.embed(tiny_clip.preprocess(queries))
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    protos = torch.stack([emb[y == k].mean(0) for k in range(3)])
    if distance == "sqeuclidean":
        d = torch.cdist(q, protos) ** 2
    else:
        d = 1 - torch.nn.functional.cosine_similarity(q[:, None], protos[None], dim=-1)
    assert torch.allclose(p, torch.softmax(-d, dim=-1), atol=1e-4)


def test_a_support_image_is_closest_to_its_own_class(tiny_vit):
    images, labels = _task(shots=(1, 1, 1))
    clf = FewShotClassifier(tiny_vit).fit(images, labels)
    assert clf.predict(images) == labels


def test_cache_avoids_re_embedding_and_is_bounded(tiny_clip):
    images, labels = _task()
    clf = FewShotClassifier(tiny_clip, batch_size=4).fit(images, labels)
    first = clf.prototypes.clone()
    assert clf.stats == {"embedded": 6, "cache_hits": 0}
    clf.fit(images, labels)
    assert clf.stats == {"embedded": 6, "cache_hits": 6}
    assert torch.equal(clf.prototypes, first)
    small = FewShotClassifier(tiny_clip, cache_size=2).fit(images, labels)
    assert len(small._cache) == 2
    assert torch.allclose(small.prototypes, first, atol=1e-6)
    dup = FewShotClassifier(tiny_clip).fit(images + [images[0].copy()], labels + ["class 0"])
    assert dup.stats["embedded"] == 6  # identical content is embedded once


def test_lora_is_attached_per_call_and_removed(tiny_clip):
    images, labels = _task()
    original = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    base = FewShotClassifier(tiny_clip).fit(images, labels).prototypes
    inject_lora(tiny_clip.model, LoRAConfig())
    with torch.no_grad():
        for p in lora_parameters(tiny_clip.model):
            p.normal_(0, 0.3)
    adapter = LoRAAdapter.from_model(tiny_clip.model, LoRAConfig())
    remove_lora(tiny_clip.model)
    clf = FewShotClassifier(tiny_clip, lora=adapter).fit(images, labels)
    assert not torch.allclose(clf.prototypes, base, atol=1e-3)
    assert not list(lora_layers(tiny_clip.model))  # the shared backbone is left clean, bit for bit
    assert all(torch.equal(v, original[k]) for k, v in tiny_clip.model.state_dict().items())
    assert torch.allclose(FewShotClassifier(tiny_clip).fit(images, labels).prototypes, base)


def test_bf16_autocast_runs_and_mostly_agrees(tiny_clip):
    images, labels = _task()
    fp32 = FewShotClassifier(tiny_clip).fit(images, labels).predict_proba(images)
    bf16 = FewShotClassifier(tiny_clip, bf16=True).fit(images, labels).predict_proba(images)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.1


def test_bad_support(tiny_clip):
    images, labels = _task()
    clf = FewShotClassifier(tiny_clip)
    with pytest.raises(ValueError, match="at least 2 classes"):
        clf.fit(images[:2], ["a", "a"])
    with pytest.raises(ValueError, match="labels"):
        clf.fit(images, labels[:-1])
    with pytest.raises(RuntimeError, match="fit"):
        clf.predict_proba(images)
    with pytest.raises(ValueError, match="distance"):
        FewShotClassifier(tiny_clip, distance="manhattan")


def test_class_slots_are_named_checked_and_numbered_in_errors():
    from recycle.predict import MAX_NAME_LENGTH, SupportError, support_from_slots

    assert support_from_slots([("  cafe\u0301 ", ["a"]), ("", []), ("dog", ["b", "c"])]) == {
        "caf\u00e9": ["a"],  # trimmed, and NFC: one way of writing an accent
        "dog": ["b", "c"],
    }
    for slots, message in [
        ([("a", [1]), ("b\nc", [2])], "Class 2's name contains a line break"),
        ([("\u200b", [])], "Class 1's name has only invisible characters"),
        ([("", [1, 2])], r"Class 1 has 2 image\(s\) but no name"),
        ([("x" * (MAX_NAME_LENGTH + 1), [1])], f"Class 1's name is {MAX_NAME_LENGTH + 1} characters long"),
        ([("red", [1]), ("", []), ("re\u200bd", [2])], "Classes 1 and 3 are both named 'red'"),
    ]:
        with pytest.raises(SupportError, match=message):
            support_from_slots(slots)

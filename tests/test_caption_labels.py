"""CaptionLabeller: zero-shot class labels of real CIFAR-10 web-like captions with the real MiniLM encoder."""

from __future__ import annotations

import pytest
import torch
from test_sources import real_encoders

from retrofit.caption_labels import CaptionLabeller, class_prototypes
from retrofit.cifar10_lt import load_wordnet


@pytest.fixture(scope="module")
def labeller(data_dir, cifar_classes):
    lemmas, glosses = load_wordnet(data_dir)
    return CaptionLabeller(real_encoders()["text_encoder"], cifar_classes, synonyms=lemmas, descriptions=glosses)


def test_prototypes_cover_names_synonyms_and_descriptions():
    texts, owner = class_prototypes(["cat", "car"], synonyms=[["cat", "true_cat"], ["auto"]],
                                    descriptions=["a feline", None], template="a photo of a {}.")
    assert texts == ["a photo of a cat.", "a photo of a true cat.", "a feline",
                     "a photo of a car.", "a photo of a auto."]
    assert owner == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="one entry per class"):
        class_prototypes(["cat", "car"], synonyms=[["kitty"]])
    with pytest.raises(ValueError, match="template"):
        class_prototypes(["cat"], template="a photo")
    with pytest.raises(ValueError, match="empty"):
        class_prototypes([])
    with pytest.raises(ValueError, match="list of strings"):  # a bare string would be split into letters
        class_prototypes(["cat", "car"], synonyms=["kitty", ["auto"]])
    with pytest.raises(ValueError, match="description"):
        class_prototypes(["cat"], descriptions=[["a feline"]])
    with pytest.raises(ValueError, match="distinct"):
        class_prototypes(["cat", "cat"])
    # one prototype owned by two classes: a caption saying it was always the first class (accepted before)
    for names in (["sports_car", "sports car"], ["Cat", "cat"], ["cat", "cat "]):
        with pytest.raises(ValueError, match=r"distinct \(case, spaces and underscores aside\)"):
            class_prototypes(names)
    with pytest.raises(ValueError, match="'automobile' names two classes, 'car' and 'automobile'"):
        class_prototypes(["car", "automobile"], synonyms=[["automobile"], []])


def test_labels_real_captions_like_the_documented_rates(labeller, cifar_train_small):
    caps = [s["caption"] for s in cifar_train_small]
    truth = torch.tensor([int(s["label"]) for s in cifar_train_small])
    got = labeller(caps)
    assert got.shape == truth.shape and got.dtype == torch.int64
    assert ((got >= -1) & (got < 10)).all()
    right, unknown = (got == truth).float().mean().item(), (got < 0).float().mean().item()
    # the captions: ~60% template + synonym, 15% gloss, 10% uninformative, 15% misleading (another class named)
    assert 0.65 <= right <= 0.9, right
    assert 0.03 <= unknown <= 0.2, unknown
    # text and stored-vector paths agree (the demo labels a KB's stored MiniLM vectors)
    vec = real_encoders()["text_encoder"].encode(caps)
    assert torch.equal(labeller.label_vectors(vec), got)


def test_clear_cases_and_unknowns(labeller, cifar_classes):
    got = labeller(["a blurry photo of the motorcar.", "a good photo of the cervid.", "IMG_0412.jpg", None, "  ",
                    "a vessel that carries passengers or freight"])
    car, deer, ship = (cifar_classes.index(c) for c in ("automobile", "deer", "ship"))
    assert got.tolist() == [car, deer, -1, -1, -1, ship]
    strict = CaptionLabeller(labeller.encoder, cifar_classes, min_similarity=1.0)  # nothing reaches 1.0
    assert (strict(["a photo of a dog [HD]", "a photo of the big bird."]) == -1).all()


def test_bad_input_is_refused(labeller, cifar_classes):
    with pytest.raises(ValueError, match="min_similarity"):
        CaptionLabeller(labeller.encoder, cifar_classes, min_similarity=1.5)
    with pytest.raises(ValueError, match="list of captions"):
        labeller("a photo of a cat.")
    with pytest.raises(ValueError, match=r"\(N, 384\)"):
        labeller.label_vectors(torch.zeros(3, 512))
    with pytest.raises(ValueError, match="NaN"):
        labeller.label_vectors(torch.full((1, 384), float("nan")))
    with pytest.raises(ValueError, match="batch_size"):
        labeller(["x"], batch_size=0)


def test_blank_vectors_stay_unknown_even_with_a_permissive_threshold(labeller, cifar_classes):
    permissive = CaptionLabeller(labeller.encoder, cifar_classes, min_similarity=-1.0)  # every caption gets a class
    vec = torch.cat([torch.zeros(1, 384), real_encoders()["text_encoder"].encode(["a photo of a horse."])])
    assert permissive.label_vectors(vec).tolist() == [-1, cifar_classes.index("horse")]


def test_wordnet_synonyms_and_glosses(data_dir):
    lemmas, glosses = load_wordnet(data_dir)
    assert len(lemmas) == len(glosses) == 10
    assert "motorcar" in lemmas[1] and "cervid" in lemmas[4]
    assert all(g and '"' not in g for g in glosses)  # usage examples stripped


@pytest.mark.cuda
def test_encoder_on_gpu_gives_cpu_labels(cifar_classes):
    from retrofit.encoders import load_text_encoder

    gpu = CaptionLabeller(load_text_encoder("minilm", device="cuda"), cifar_classes)
    assert gpu.prototypes.device.type == "cpu"
    got = gpu(["a photo of a horse.", "IMG_0412.jpg"])
    assert got.device.type == "cpu" and got.tolist() == [cifar_classes.index("horse"), -1]
    vec = gpu.encoder.encode(["a photo of a ship."])  # on the GPU
    assert gpu.label_vectors(vec).tolist() == [cifar_classes.index("ship")]

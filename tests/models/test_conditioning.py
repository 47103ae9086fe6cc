"""The condition model: learned empty values replace exactly the dropped samples, for every subset."""

import itertools

import pytest
import torch

from shapekiln.models.conditioning import MODALITIES, ConditionModel, Conditions, encode_partial
from shapekiln.models.vqvae import VQVAE

from ..sample.conftest import tiny_pipeline

B = 4


@pytest.fixture(scope="module")
def parts():
    pipeline = tiny_pipeline()
    torch.manual_seed(0)
    r = pipeline.vqvae.latent_resolution
    conditions = Conditions(
        text=["a tall table", "a short stool", "a red mug", "a bed"],
        image=torch.rand(B, 3, 40, 40),
        partial=torch.randn(B, pipeline.vqvae.config.latent_channels + 1, r, r, r),
    )
    return pipeline.conditioning, conditions


@pytest.mark.parametrize("dropped", [subset for n in range(4) for subset in itertools.combinations(MODALITIES, n)])
def test_every_subset_of_dropped_modalities(parts, dropped):
    model, full = parts
    which = torch.tensor([True, False, True, False])  # samples 0 and 2 drop the modalities in `dropped`
    kept_context, kept_mask, kept_partial = model(full, B)
    conditions = Conditions(full.text, full.image, full.partial, drop={name: which for name in dropped})
    context, mask, partial = model(conditions, B)
    text_tokens = model.config.text_tokens
    empties = {
        "text": (slice(0, text_tokens), model.empty_text),
        "image": (slice(text_tokens, None), model.empty_image),
    }
    for name, (span, empty) in empties.items():
        for sample in range(B):
            got = context[sample, span]
            if name in dropped and which[sample]:
                assert torch.equal(got, empty), (name, sample)
                assert mask[sample, span].all()
            else:
                assert torch.equal(got, kept_context[sample, span]), (name, sample)
                assert torch.equal(mask[sample, span], kept_mask[sample, span])
    for sample in range(B):
        if "partial" in dropped and which[sample]:
            assert torch.equal(partial[sample], model.empty_partial.view(-1, 1, 1, 1).expand_as(partial[sample]))
        else:
            assert torch.equal(partial[sample], kept_partial[sample])
    if dropped:  # the check can fail: a dropped sample differs from its kept version
        assert not (torch.equal(context, kept_context) and torch.equal(partial, kept_partial))


def test_absent_modalities_use_the_same_empty_values_as_dropped_ones(parts):
    model, full = parts
    dropped = model(Conditions(full.text, full.image, full.partial, drop={name: torch.ones(B, dtype=torch.bool) for name in MODALITIES}), B)
    absent = model(Conditions(), B)
    for one, other in zip(dropped, absent):
        assert torch.equal(one, other)


def test_text_padding_is_masked_and_empty_text_attends_everywhere(parts):
    model, full = parts
    _, mask, _ = model(Conditions(text=full.text), B)
    text_mask = mask[:, : model.config.text_tokens]
    assert text_mask.sum(1).tolist() != [model.config.text_tokens] * B  # short captions leave padding
    assert text_mask[:, 0].all()


def test_the_partial_condition_sees_only_the_known_region():
    torch.manual_seed(0)
    vqvae = VQVAE(resolution=16, base_channels=8, norm_groups=4, codebook_size=8).eval()
    known = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    known[..., :8] = True  # z < 0 half
    a, b = torch.randn(2, 1, 1, 16, 16, 16) * 0.1
    b = torch.where(known, a, b)  # equal on the known half only
    zeros, ones = torch.zeros(3), torch.ones(3)
    condition_a = encode_partial(vqvae, a, known, zeros, ones)
    assert torch.equal(condition_a, encode_partial(vqvae, b, known, zeros, ones))
    cells = condition_a[0, -1]
    assert cells[..., :2].all() and not cells[..., 2:].any()  # 4 voxels per cell: cells 0-1 of 4 are known
    assert torch.equal(condition_a[0, :3][:, ~cells.bool()], torch.zeros(3, int((~cells.bool()).sum())))
    assert not torch.equal(condition_a, encode_partial(vqvae, a * 2, known, zeros, ones))


def test_bad_modalities_are_refused():
    with pytest.raises(ValueError, match="non-empty subset"):
        ConditionModel(modalities=("text", "sound"))
    with pytest.raises(ValueError, match="non-empty subset"):
        ConditionModel(modalities=())

"""The condition model: learned empty values replace exactly the dropped samples, for every subset,
in the tokens and in the input channels (partial shape, the latent heads' estimates)."""

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
    assert tuple(model.heads) == ("text", "image")  # the tiny config: both estimates are input channels too
    which = torch.tensor([True, False, True, False])  # samples 0 and 2 drop the modalities in `dropped`
    kept = model(full, B)
    conditions = Conditions(full.text, full.image, full.partial, drop={name: which for name in dropped})
    encoded = model(conditions, B)
    text_tokens, c = model.config.text_tokens, model.config.latent_channels
    empties = {  # modality: (the span of its tokens or channels, its learned empty value)
        "text": (encoded.context, kept.context, slice(0, text_tokens), model.empty_text),
        "image": (encoded.context, kept.context, slice(text_tokens, None), model.empty_image),
        "partial": (encoded.channels, kept.channels, slice(0, c + 1), model.empty_partial.view(-1, 1, 1, 1)),
        "text latent": (encoded.channels, kept.channels, slice(c + 1, 2 * c + 1), model.empty_latents["text"].view(-1, 1, 1, 1)),
        "image latent": (encoded.channels, kept.channels, slice(2 * c + 1, None), model.empty_latents["image"].view(-1, 1, 1, 1)),
    }
    for name, (got, reference, span, empty) in empties.items():
        tokens = name in ("text", "image")
        for sample in range(B):
            if name.split()[0] in dropped and which[sample]:
                assert torch.equal(got[sample, span], empty.expand_as(got[sample, span])), (name, sample)
                assert not tokens or encoded.context_mask[sample, span].all()  # empty tokens are all attended
            else:
                assert torch.equal(got[sample, span], reference[sample, span]), (name, sample)
                assert not tokens or torch.equal(encoded.context_mask[sample, span], kept.context_mask[sample, span])
    # each head's estimate is there for every given condition, dropped or not (its regression loss sees them all)
    assert encoded.head_latents.keys() == {"text", "image"}
    assert all(torch.equal(encoded.head_latents[name], kept.head_latents[name]) for name in ("text", "image"))
    if dropped:  # the check can fail: a dropped sample differs from its kept version
        assert not (torch.equal(encoded.context, kept.context) and torch.equal(encoded.channels, kept.channels))


def test_absent_modalities_use_the_same_empty_values_as_dropped_ones(parts):
    model, full = parts
    dropped = model(Conditions(full.text, full.image, full.partial, drop={name: torch.ones(B, dtype=torch.bool) for name in MODALITIES}), B)
    absent = model(Conditions(), B)
    for one, other in zip(dropped[:3], absent[:3]):  # context, its mask, channels
        assert torch.equal(one, other)
    assert absent.head_latents == {}
    assert dropped.head_latents["image"].shape == (B, model.config.latent_channels, *[model.config.latent_resolution] * 3)


def test_the_text_head_pools_only_the_attended_tokens(parts):
    """Padding tokens do not reach the text head's estimate: a pooled head averages the masked tokens."""
    model, full = parts
    head = model.heads["text"]
    tokens = torch.randn(2, 5, model.config.text_dim)  # the tower's own features
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    changed = tokens.clone()
    changed[0, 2:] += 10.0  # padding of sample 0 only
    with torch.no_grad():
        assert torch.allclose(head(changed, mask), head(tokens, mask), atol=1e-6)
        changed[1, 4] += 10.0  # an attended token of sample 1
        assert not torch.allclose(head(changed, mask)[1], head(tokens, mask)[1], atol=1e-3)


def test_the_text_head_reads_the_tower_features_not_the_cross_attention_projection(parts):
    """So the heads' own learning rate (latent_head_lr) never moves the tokens cross-attention reads."""
    model, full = parts
    with torch.no_grad():
        before = model(Conditions(text=full.text), B)
        saved = model.text_proj.weight.clone()
        model.text_proj.weight.add_(1.0)
        after = model(Conditions(text=full.text), B)
        model.text_proj.weight.copy_(saved)
    assert torch.equal(before.head_latents["text"], after.head_latents["text"])
    assert not torch.allclose(before.context, after.context)


def test_text_padding_is_masked_and_empty_text_attends_everywhere(parts):
    model, full = parts
    mask = model(Conditions(text=full.text), B).context_mask
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
    with pytest.raises(ValueError, match="latent_heads must be conditioned modalities among text and image"):
        ConditionModel(modalities=("text", "partial"), latent_heads=("image",))
    with pytest.raises(ValueError, match="latent_heads must be conditioned modalities among text and image"):
        ConditionModel(modalities=("text", "partial"), latent_heads=("partial",))

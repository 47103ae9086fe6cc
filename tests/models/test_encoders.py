"""Condition encoders: the embedded MiniLM text tower, open_clip towers on a tiny CLIP model built and
saved here, the trainable image encoder, RGBA compositing."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from shapekiln.errors import ShapekilnError
from shapekiln.models.encoders import ConvImageEncoder, load_image_tower, load_text_tower, rgba_to_rgb

SHORT, LONG = "a red chair", "a tall wooden table with four thin legs and a round glass top"
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


# --- MiniLM (the embedded default) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """Loaded once for the module (a cold load takes seconds); every later load reuses the model."""
    return load_text_tower("minilm")


def test_minilm_shapes_and_mask_follow_the_tokenizer(minilm):
    endless = " ".join(["a very long caption"] * 20)
    tokens, mask = minilm([SHORT, LONG, endless])
    assert tokens.shape == (3, 32, 384) and tokens.dtype == torch.float32
    assert mask.shape == (3, 32) and mask.dtype == torch.bool
    tokenizer = minilm.model[0].tokenizer
    for row, text in zip(mask, (SHORT, LONG)):
        count = len(tokenizer.tokenize(text)) + 2  # [CLS] ... [SEP]
        assert row.tolist() == [True] * count + [False] * (32 - count)
    assert mask[1].sum() > mask[0].sum()
    assert bool(mask[2].all())  # truncated to max_tokens
    assert bool((tokens[~mask] == 0).all()) and bool((tokens[mask].abs().sum(-1) > 0).all())


def test_minilm_tokens_are_what_sentence_transformers_computes(minilm):
    tokens, mask = minilm([SHORT, LONG])
    for row, row_mask, text in zip(tokens, mask, (SHORT, LONG)):
        expected = minilm.model.encode([text], output_value="token_embeddings", convert_to_tensor=True)[0]
        assert torch.allclose(row[row_mask], expected.cpu(), atol=1e-4)


def test_minilm_padding_is_ignored_and_output_deterministic(minilm):
    alone = load_text_tower("minilm")  # shares the loaded model, its own caption cache
    batched = load_text_tower("minilm")
    assert alone.model is minilm.model
    tokens_alone, mask_alone = alone([SHORT])
    tokens_batched, mask_batched = batched([LONG, SHORT])
    assert torch.equal(mask_alone[0], mask_batched[1])
    # Bit-identical, not just close: resumed training runs must repeat the original exactly.
    assert torch.equal(tokens_alone[0], tokens_batched[1])
    crowd = load_text_tower("minilm")
    tokens_crowd, _ = crowd([f"caption number {k} about a chair" for k in range(20)] + [SHORT])
    assert torch.equal(tokens_crowd[-1], tokens_alone[0])  # 21 captions: two chunks, SHORT in the second
    again = load_text_tower("minilm")([SHORT])[0]
    assert torch.allclose(again, tokens_alone, atol=1e-6)


def test_minilm_caption_cache_returns_identical_tensors():
    tower = load_text_tower("minilm", cache_size=2)
    first_tokens, first_mask = tower([SHORT, LONG, SHORT])
    assert torch.equal(first_tokens[0], first_tokens[2])
    second_tokens, second_mask = tower([LONG, SHORT])
    assert torch.equal(second_tokens, first_tokens[[1, 0]]) and torch.equal(second_mask, first_mask[[1, 0]])
    tower(["a lamp", "a mug", "a vase"])
    assert len(tower._cache) == 2  # bounded LRU


def test_minilm_is_frozen_and_out_of_its_holders_weights(minilm):
    holder = nn.ModuleDict({"text": minilm, "proj": nn.Linear(384, 8)})
    holder.train()
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert list(minilm.parameters()) == [] and minilm.state_dict() == {}
    assert set(holder.state_dict()) == {"proj.weight", "proj.bias"}
    assert copy.deepcopy(holder)["text"].model is minilm.model  # an EMA copy shares the frozen model
    tokens, _ = minilm([SHORT])
    assert not tokens.requires_grad
    holder["proj"](tokens).sum().backward()  # no-grad features still feed a trainable layer
    assert holder["proj"].weight.grad is not None


def test_minilm_loaded_earlier_is_reused_under_meta_init(minilm):
    """diffusers' from_pretrained builds modules under init_empty_weights: a loaded tower is reused as is."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        tower = load_text_tower("minilm")
    assert tower.model is minilm.model
    assert torch.equal(tower([SHORT])[0], minilm([SHORT])[0])


def test_text_spec_round_trip_and_errors(minilm):
    assert minilm.spec == {"kind": "minilm", "max_tokens": 32}
    rebuilt = load_text_tower({"kind": "minilm", "max_tokens": 16})
    assert rebuilt.max_tokens == 16 and rebuilt([SHORT])[0].shape == (1, 16, 384)
    assert load_text_tower(rebuilt.spec).spec == rebuilt.spec
    with pytest.raises(ShapekilnError, match="not known"):
        load_text_tower("bert")
    with pytest.raises(ShapekilnError, match="not known"):
        load_text_tower({"kind": "t5"})
    with pytest.raises(ShapekilnError, match="unknown key 'layers'"):
        load_text_tower({"kind": "minilm", "layers": 3})
    with pytest.raises(ShapekilnError, match="at most 512"):
        load_text_tower("minilm", max_tokens=600)
    with pytest.raises(ShapekilnError, match="needs 'checkpoint'"):
        load_text_tower({"kind": "open_clip", "model": "ViT-B-32"})


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed here: the missing-extra message cannot show")
def test_open_clip_paths_name_the_clip_extra_when_it_is_missing(tmp_path):
    spec = {"kind": "open_clip", "model": "ViT-B-32", "checkpoint": str(tmp_path / "clip.safetensors")}
    with pytest.raises(ShapekilnError, match=r"open_clip is not installed.*clip extra"):
        load_text_tower(spec)
    with pytest.raises(ShapekilnError, match=r"open_clip is not installed.*clip extra"):
        load_image_tower(spec)


# --- open_clip towers on a tiny CLIP built here ----------------------------------------------------

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_tiny_clip(folder: Path, name: str, config: dict):
    """A tiny real open_clip CLIP: its config JSON and safetensors weights in `folder`, and the model."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (the clip extra)")
    from safetensors.torch import save_file

    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    checkpoint = folder / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(checkpoint))
    return model, {"kind": "open_clip", "model": str(config_path), "checkpoint": str(checkpoint)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), "tiny_clip", TINY)


def test_open_clip_text_tower_is_the_models_own_token_output(tiny_clip):
    import open_clip

    model, spec = tiny_clip
    tower = load_text_tower(spec, max_tokens=12)
    texts = [SHORT, LONG]
    tokens, mask = tower(texts)
    assert tokens.shape == (2, 12, 32) and tower.dim == 32 and tower.spec["max_tokens"] == 12

    ids = open_clip.get_tokenizer("tiny_clip")(texts)  # (2, 16)
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # (2, 16, 32)
        pooled = model.encode_text(ids)
    assert torch.allclose(tokens[mask], x[:, :12][mask], atol=1e-6)
    assert bool((tokens[~mask] == 0).all())
    # the mask runs through the end-of-text token; the pooled feature sits there
    short_count = len(open_clip.get_tokenizer("tiny_clip").encode(SHORT)) + 2  # <start> ... <end>
    assert mask[0].tolist() == [True] * short_count + [False] * (12 - short_count)
    assert bool(mask[1].all())  # the long caption is cut at 12 tokens
    assert torch.allclose(tokens[0, short_count - 1] @ model.text_projection, pooled[0], atol=1e-6)

    padded = load_text_tower(spec, max_tokens=20)(texts)  # longer than the context (16): zero padding
    assert padded[0].shape == (2, 20, 32) and not bool(padded[1][:, 16:].any())
    assert torch.allclose(padded[0][:, :12], tokens, atol=1e-6)


def test_open_clip_image_tower_is_the_models_own_patch_output(tiny_clip):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    model, spec = tiny_clip
    tower = load_image_tower(spec)
    assert (tower.dim, tower.num_tokens, tower.image_size) == (32, 16, 32)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    patches = tower(images)
    assert patches.shape == (2, 16, 32) and not patches.requires_grad

    pixels = (images - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    visual = model.visual
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (2, 16, 32)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_post(visual.transformer(visual.ln_pre(x)))  # (2, 17, 32)
        pooled = model.encode_image(pixels)
    assert torch.allclose(x[:, 0] @ visual.proj, pooled, atol=1e-5)  # the reference is the model's path
    assert torch.allclose(patches, x[:, 1:], atol=1e-5)

    assert tower(torch.rand(3, 3, 80, 64)).shape == (3, 16, 32)  # any size: resized and cropped inside
    assert not any(p.requires_grad for p in tower.model.parameters()) and tower.state_dict() == {}


def test_open_clip_follows_to_and_refuses_a_fresh_load_under_meta_init(tmp_path):
    from accelerate import init_empty_weights

    _, spec = build_tiny_clip(tmp_path, "tiny_clip_fresh", TINY)  # its own files: not cached yet
    with init_empty_weights(), pytest.raises(RuntimeError, match="meta-device context"):
        load_text_tower(spec)  # the weights would come out empty
    tower = load_text_tower(spec)
    tokens = tower([SHORT])[0]
    tower.clear_cache()
    tower.double()  # .to() reaches the hidden model
    assert {p.dtype for p in tower.model.parameters()} == {torch.float64}
    tokens64 = tower([SHORT])[0]
    assert tokens64.dtype == torch.float32 and torch.allclose(tokens64, tokens, atol=1e-5)


def test_open_clip_refuses_pickled_checkpoints(tiny_clip, tmp_path):
    model, spec = tiny_clip
    marker = tmp_path / "unpickled"

    class Tripwire:  # unpickling this creates `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for suffix in (".bin", ".pt", ".pth"):
        pickled = tmp_path / f"tiny{suffix}"
        torch.save({**model.state_dict(), "tripwire": Tripwire()}, pickled)
        for load in (load_text_tower, load_image_tower):
            with pytest.raises(ShapekilnError, match="only safetensors"):
                load({**spec, "checkpoint": str(pickled)})
    assert not marker.exists()


def test_open_clip_bad_checkpoints_and_names(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    model, spec = tiny_clip
    with pytest.raises(ShapekilnError, match="does not exist"):
        load_text_tower({**spec, "checkpoint": str(tmp_path / "absent.safetensors")})

    wider = copy.deepcopy(TINY)
    wider["text_cfg"]["width"] = 48
    _, other = build_tiny_clip(tmp_path, "tiny_clip_wider", wider)
    with pytest.raises(ShapekilnError, match=r"key \S+ has shape .* the model needs"):
        load_image_tower({**spec, "checkpoint": other["checkpoint"]})

    incomplete = tmp_path / "incomplete.safetensors"
    weights = {key: value.contiguous() for key, value in model.state_dict().items() if key != "ln_final.weight"}
    save_file(weights, str(incomplete))
    with pytest.raises(ShapekilnError, match="key ln_final.weight is missing"):
        load_text_tower({**spec, "checkpoint": str(incomplete)})

    with pytest.raises(ShapekilnError, match="'ViT-Nope-99' is not known"):
        load_text_tower({**spec, "model": "ViT-Nope-99"})
    with pytest.raises(ShapekilnError, match="does not exist"):
        load_image_tower({**spec, "model": str(tmp_path / "absent.json")})
    with pytest.raises(ShapekilnError, match="not an open_clip model config"):
        (tmp_path / "other.json").write_text(json.dumps({"hidden_size": 8}))
        load_image_tower({**spec, "model": str(tmp_path / "other.json")})


# --- the trainable image encoder and RGBA views ----------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_conv_image_encoder_tokens(size):
    torch.manual_seed(0)
    encoder = ConvImageEncoder(out_dim=24)
    assert encoder.num_tokens == 16
    assert encoder(torch.rand(2, 3, size, size)).shape == (2, 16, 24)
    assert ConvImageEncoder(out_dim=8, image_size=32, channels=(16, 16)).num_tokens == 64


def test_conv_image_encoder_trains_every_parameter():
    torch.manual_seed(0)
    encoder = ConvImageEncoder(out_dim=16, image_size=32, channels=(8, 16, 16))
    encoder(torch.rand(2, 3, 48, 48)).square().mean().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="not divisible"):
        ConvImageEncoder(out_dim=8, image_size=40)


def test_rgba_to_rgb_composites_over_the_background():
    color = (200, 100, 0)
    views = torch.tensor([[*color, alpha] for alpha in (0, 255, 128)], dtype=torch.uint8).view(3, 4, 1, 1)
    rgb = rgba_to_rgb(views, background=1.0)
    assert rgb.shape == (3, 3, 1, 1) and rgb.dtype == torch.float32
    expected_color = torch.tensor(color) / 255
    assert torch.allclose(rgb[0, :, 0, 0], torch.ones(3))
    assert torch.allclose(rgb[1, :, 0, 0], expected_color)
    a = 128 / 255
    assert torch.allclose(rgb[2, :, 0, 0], expected_color * a + (1 - a))
    assert torch.allclose(rgba_to_rgb(views, background=0.0)[2, :, 0, 0], expected_color * a)
    batched = views.view(1, 3, 4, 1, 1).expand(2, 3, 4, 1, 1)  # (B, K, 4, H, W) as the reader batches views
    assert torch.equal(rgba_to_rgb(batched)[1], rgb)

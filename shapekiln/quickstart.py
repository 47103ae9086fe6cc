"""`shapekiln quickstart`: from nothing to text-conditioned shapes on a CPU, every stage with its defaults.

    synthetic shapes ─prep─▶ OUT/data ─encode (the shipped general-32 VQ-VAE)─▶ OUT/latents
        ─train ldm─▶ OUT/ldm/pipeline ─sample─▶ OUT/samples/<prompt>/, OUT/samples/completion/, OUT/preview.png

With `--vqvae train` (the default at the tiny config) a VQ-VAE is trained on the data first, into OUT/vqvae.

Each stage skips what a previous run already finished (prep and encode resume shard by shard, a
trainer with checkpoints resumes from the latest), so an interrupted quickstart picks up where it was.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from shapekiln.config import load_config
from shapekiln.evaluate import write_json

PROMPTS = (
    "a tall round table with four legs",
    "a short square table on a pedestal",
    "a chair with arms and a back",
    "a tall lamp with a cone shade",
)


def quickstart(out: Path, count: int = 1000, workers: int = 2, vqvae_steps: int | None = 1600, ldm_steps: int | None = None,
               prompts: Sequence[str] = PROMPTS, samples_per_prompt: int = 4, progress: bool = True, config: str = "small",
               vqvae: str | None = None) -> Path:
    """Run every stage into `out` with the `config` size (configs/*/<config>.yaml: small, or tiny for a
    quick check); returns the path of the overview PNG.

    `vqvae`: a VQ-VAE folder or shipped name to encode with, or "train" to train one on the data
    (`vqvae_steps` steps); default the shipped general-32 at the small config, "train" at tiny (16³)."""
    from shapekiln.data_prep.latents import encode_shards
    from shapekiln.data_prep.shards import run_prep
    from shapekiln.data_prep.sources.synthetic import SyntheticSource
    from shapekiln.data_prep.process import PrepConfig
    from shapekiln.models.pretrained import resolve as resolve_pretrained
    from shapekiln.train import ldm
    from shapekiln.train import vqvae as vqvae_training

    started = time.perf_counter()
    data, latents = out / "data", out / "latents"
    _stage("prep", started)
    prep_config = load_config(PrepConfig, config, "data")
    source = SyntheticSource.for_config(count, prep_config)
    summary = run_prep(source, prep_config, data, workers=workers, progress=progress, source_args=source.args())
    print(summary.line(data))

    autoencoder = vqvae or ("general-32" if config == "small" else "train")
    if autoencoder == "train":
        _stage("train vqvae", started)
        vqvae_config = load_config(vqvae_training.VQVAEConfig, config, "vqvae")
        vqvae_config.data.shards, vqvae_config.train.output_dir = str(data), str(out / "vqvae")
        if vqvae_steps is not None:
            vqvae_config.train.max_steps = vqvae_steps
        vqvae_model = _train_once(vqvae_training.train, vqvae_config, out / "vqvae", "model", progress)
    else:
        vqvae_model = resolve_pretrained(autoencoder)
        print(f"VQ-VAE: {autoencoder} ({vqvae_model}), not trained here")

    _stage("encode", started)
    print(encode_shards(vqvae_model, data, latents, progress=progress).line(latents))

    _stage("train ldm", started)
    ldm_config = load_config(ldm.LDMConfig, config, "ldm")
    ldm_config.vqvae, ldm_config.data.shards, ldm_config.train.output_dir = str(vqvae_model), str(latents), str(out / "ldm")
    if ldm_steps is not None:
        ldm_config.train.max_steps = ldm_steps
    pipeline_dir = _train_once(ldm.train, ldm_config, out / "ldm", "pipeline", progress)

    _stage("sample", started)
    overview = sample_overview(pipeline_dir, data, out / "samples", prompts, samples_per_prompt, progress)
    seconds = time.perf_counter() - started
    # What this run took (stages a resumed run skipped count as nothing): read by bench/structure.py.
    write_json(out / "quickstart.json", {"seconds": seconds, "config": config, "count": count, "vqvae": autoencoder})
    print(f"quickstart: done in {seconds:.0f} s; overview {overview}")
    return overview


def _stage(name: str, started: float) -> None:
    print(f"== {name} ({time.perf_counter() - started:.0f} s)", flush=True)


def _train_once(train, config, run_dir: Path, saved: str, progress: bool) -> Path:
    """Train unless the run already saved its model; resume from the latest checkpoint if there is one."""
    from shapekiln.train.common import latest_checkpoint

    if (run_dir / saved).is_dir():
        print(f"{run_dir / saved} exists: skipping training")
        return run_dir / saved
    return train(config, resume="latest" if latest_checkpoint(run_dir) else None, progress=progress)


def sample_overview(pipeline_dir: Path, data: Path, out: Path, prompts: Sequence[str], count: int, progress: bool) -> Path:
    """Samples for each prompt and a completion of a held-out shape; one overview PNG of them all."""
    from shapekiln.data_prep.preview import tsdf_to_mesh
    from shapekiln.data_prep.reader import ShapeShards, list_shards
    from shapekiln.sample.export import preview_sheet, write_samples
    from shapekiln.sample.partial import known_region
    from shapekiln.sample.pipeline import ShapePipeline

    pipeline = ShapePipeline.from_pretrained(pipeline_dir)
    rows = []
    for prompt in prompts:
        output = pipeline(text=prompt, num_samples=count, seed=0, progress=progress)
        meshes = [shape.mesh for shape in output.shapes]
        write_samples(meshes, [shape.tsdf for shape in output.shapes], out / _slug(prompt), {"text": prompt})
        rows.append(preview_sheet(meshes, {"text": prompt}, columns=count, labels=_pieces(output.shapes)))

    held_out = next(iter(ShapeShards(list_shards(data, "test"))))
    tsdf = held_out["tsdf"][0].numpy()
    known = known_region("z<0", tsdf.shape[0])
    output = pipeline(partial=tsdf, known_mask=known, num_samples=count, seed=0, progress=progress)
    kept = tsdf_to_mesh(np.where(known, tsdf, pipeline.config.tau))
    condition = {"text": f"complete: {held_out['caption']} (z<0 kept)", "partial": kept}
    meshes = [shape.mesh for shape in output.shapes]
    write_samples(meshes, [shape.tsdf for shape in output.shapes], out / "completion", condition, prefix="completion")
    rows.append(preview_sheet(meshes, condition, columns=count, labels=_pieces(output.shapes)))

    sheet = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    path = out.parent / "preview.png"
    sheet.save(path)
    return path


def _pieces(shapes) -> list[str]:
    """Per raw sample, "N pieces" when its inside is not one 26-connected piece (the structure metric), else ""."""
    from shapekiln.metrics import structure

    return [f"{pieces} pieces" if (pieces := structure(shape.tsdf)["pieces"]) != 1 else "" for shape in shapes]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]

"""The paper-size (SDFusion) configs on a GPU: every stage end to end, with its speed and memory, beside
the same model's training step on the CPU.

    python bench/gpu.py                                  # 256 synthetic shapes at 64³
    python bench/gpu.py --count 24 --seconds 10          # a smoke run
    python bench/gpu.py --device cpu --config tiny ...   # the same stages on the CPU (tests the script)

Stages, each through the project's own code: prep (the data config: 64³, 8 views at 256², on every CPU
core), train vqvae, encode, train ldm and train view-prior (their configs, each stopped by its time limit
after --seconds of steps), sample (DDIM with the config's steps, SDFusion's inference, and DPM++-20), one
guided step with text, image and partial shape batched against looped, a learned completion, and SDS
refinement of a sample's latent under the view prior. Printed per model: the trainer's steps/s and
samples/s (data loading included), peak accelerator memory, one training step of the model alone
(forward, backward, AdamW, the config's precision) at the config's batch on the device and at batch 1
on the CPU, per sample side by side, and how long the config's max_steps would take at the trainer's rate.
Models trained for seconds make poor shapes: this measures speed and that every stage runs, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from shapekiln.config import load_config, to_dict
from shapekiln.data_prep.process import PrepConfig
from shapekiln.data_prep.reader import ShapeShards, list_shards
from shapekiln.data_prep.latents import encode_shards
from shapekiln.data_prep.shards import run_prep
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.models.conditioning import Conditions, LatentDiffusion
from shapekiln.models.io import load_pretrained
from shapekiln.models.priors import load_prior
from shapekiln.models.vqvae import VQVAE
from shapekiln.sample.export import preview_sheet
from shapekiln.sample.partial import known_region
from shapekiln.sample.pipeline import ShapePipeline
from shapekiln.sample.refine import RefineConfig, refine
from shapekiln.train import ldm, view_prior, vqvae
from shapekiln.train.common import latest_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from ldm import guidance_timing  # noqa: E402  (bench/ldm.py)

PROMPT = "a tall round table with four legs"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def step_seconds(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], device: torch.device,
                 mixed_precision: str, repeats: int) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of `model` on `device`, after one warm-up."""
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def vqvae_step(config: vqvae.VQVAEConfig, device: torch.device, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = VQVAE(**to_dict(config.model))
    resolution, tau = config.model.resolution, config.model.tau
    tsdf = (torch.rand(batch, 1, resolution, resolution, resolution, device=device) * 2 - 1) * tau

    def loss(model: VQVAE) -> torch.Tensor:
        output = model(tsdf)
        return vqvae.reconstruction_loss(output.reconstruction, tsdf, config.loss) + output.commitment_loss

    return step_seconds(model, loss, device, config.train.mixed_precision, repeats)


def ldm_step(config: ldm.LDMConfig, autoencoder: VQVAE, device: torch.device, batch: int, repeats: int) -> float:
    """The denoiser and condition model as training runs them: every configured modality given, none dropped."""
    torch.manual_seed(0)
    unet, conditioning = ldm.build_models(config, autoencoder)
    for tower in conditioning.towers.values():
        tower.to(device)
    modalities = config.conditioning.modalities
    channels, r = autoencoder.config.latent_channels, autoencoder.latent_resolution
    size = config.conditioning.image_size
    conditions = Conditions(
        text=[PROMPT] * batch if "text" in modalities else None,
        image=torch.rand(batch, 3, size, size, device=device) if "image" in modalities else None,
        partial=torch.randn(batch, channels + 1, r, r, r, device=device) if "partial" in modalities else None,
        drop={name: torch.zeros(batch, dtype=torch.bool) for name in modalities},
    )
    noisy = torch.randn(batch, channels, r, r, r, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)

    def loss(model: LatentDiffusion) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(noisy, timesteps, conditions).float(), noisy)

    return step_seconds(LatentDiffusion(unet, conditioning), loss, device, config.train.mixed_precision, repeats)


def trained(train: Callable, config, seconds: float, device: torch.device) -> tuple[Path, dict[str, float]]:
    """Run a trainer for `seconds` of steps; its saved folder and its figures."""
    reset_peak(device)
    started = time.perf_counter()
    saved = train(config, progress=False, time_limit=seconds)
    wall = time.perf_counter() - started
    steps = int(latest_checkpoint(Path(config.train.output_dir)).name.split("-")[1])
    # The time limit counts from the first step, so steps / seconds is the loop's rate (data loading included);
    # a run that reached max_steps first is timed by its wall clock, start-up included.
    rate = steps / (seconds if steps < config.train.max_steps else wall)
    return saved, {"steps": steps, "wall_s": wall, "steps_per_s": rate, "samples_per_s": rate * config.data.batch_size,
                   "peak_mb": peak_mb(device), "max_steps": config.train.max_steps,
                   "max_steps_hours": config.train.max_steps / rate / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-runs/gpu"), help="run folder (default bench-runs/gpu)")
    parser.add_argument("--config", default="paper", help="the size of every stage's config (default paper)")
    parser.add_argument("--count", type=int, default=256, help="synthetic shapes to prepare (default 256)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per model (default 60)")
    parser.add_argument("--samples", type=int, default=4, help="shapes per sampling call (default 4)")
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps of each model alone on the device")
    parser.add_argument("--cpu-repeats", type=int, default=1, help="the same on the CPU, at batch 1 (0 skips)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: give --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict] = {}

    def report(name: str, values: dict) -> None:
        figures[name] = values
        print(f"{name}: " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()), flush=True)
        (args.out / "figures.json").write_text(json.dumps(figures, indent=1))

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({gpu_name}), torch {torch.__version__}, {os.cpu_count()} CPU cores, configs '{args.config}'", flush=True)

    # Data.
    data = args.out / "data"
    prep_config = load_config(PrepConfig, args.config, "data")
    started = time.perf_counter()
    source = SyntheticSource.for_config(args.count, prep_config)
    summary = run_prep(source, prep_config, data, workers=os.cpu_count() or 1, progress=False, source_args=source.args())
    seconds = time.perf_counter() - started
    report("prep", {"shapes": summary.written, "seconds": seconds, "shapes_per_s": summary.written / seconds,
                    "resolution": prep_config.resolution, "views": prep_config.views, "view_size": prep_config.view_size})

    # VQ-VAE.
    vqvae_config = load_config(vqvae.VQVAEConfig, args.config, "vqvae")
    vqvae_config.data.shards, vqvae_config.train.output_dir = str(data), str(args.out / "vqvae")
    vqvae_dir, values = trained(vqvae.train, vqvae_config, args.seconds, device)
    batch = vqvae_config.data.batch_size
    values["step_s"] = vqvae_step(vqvae_config, device, batch, args.repeats)
    if args.cpu_repeats:
        values["cpu_step_s_batch1"] = vqvae_step(vqvae_config, torch.device("cpu"), 1, args.cpu_repeats)
        values["speedup_per_sample"] = values["cpu_step_s_batch1"] / (values["step_s"] / batch)
    report("vqvae", values)

    latents = args.out / "latents"
    reset_peak(device)
    started = time.perf_counter()
    summary = encode_shards(vqvae_dir, data, latents, progress=False, device=device)
    seconds = time.perf_counter() - started
    report("encode", {"shapes": summary.shapes, "seconds": seconds, "shapes_per_s": summary.shapes / seconds, "peak_mb": peak_mb(device)})

    # Latent diffusion.
    ldm_config = load_config(ldm.LDMConfig, args.config, "ldm")
    ldm_config.vqvae, ldm_config.data.shards, ldm_config.train.output_dir = str(vqvae_dir), str(latents), str(args.out / "ldm")
    pipeline_dir, values = trained(ldm.train, ldm_config, args.seconds, device)
    autoencoder = load_pretrained(VQVAE, vqvae_dir).eval().requires_grad_(False).to(device)
    batch = ldm_config.data.batch_size
    values["step_s"] = ldm_step(ldm_config, autoencoder, device, batch, args.repeats)
    if args.cpu_repeats:
        values["cpu_step_s_batch1"] = ldm_step(ldm_config, autoencoder.cpu(), torch.device("cpu"), 1, args.cpu_repeats)
        values["speedup_per_sample"] = values["cpu_step_s_batch1"] / (values["step_s"] / batch)
    report("ldm", values)

    # Sampling and completion.
    pipeline = ShapePipeline.from_pretrained(pipeline_dir, device=device)
    held_out = next(iter(ShapeShards(list_shards(data, "test+val"), views=True)))
    tsdf = held_out["tsdf"][0].numpy()
    outputs = []
    for scheduler, steps in (("ddim", pipeline.config.steps), ("dpm++", 20)):
        reset_peak(device)
        started = time.perf_counter()
        output = pipeline(text=PROMPT, num_samples=args.samples, steps=steps, scheduler=scheduler, seed=0, progress=False)
        seconds = time.perf_counter() - started
        outputs.append(output)
        report(f"sample {scheduler}-{steps}", {"samples": args.samples, "seconds_per_shape": seconds / args.samples, "peak_mb": peak_mb(device)})
    if "partial" in pipeline.modalities:
        started = time.perf_counter()
        output = pipeline(partial=tsdf, known_mask=known_region("z<0", tsdf.shape[0]), num_samples=args.samples, seed=0, progress=False)
        report(f"complete ddim-{pipeline.config.steps}", {"samples": args.samples, "seconds_per_shape": (time.perf_counter() - started) / args.samples})
    if set(pipeline.modalities) == {"text", "image", "partial"}:
        batched, looped = guidance_timing(pipeline, data, split="test+val")
        report("guided step (text + image + partial, 4 passes)", {"batched_ms": batched * 1000, "looped_ms": looped * 1000,
                                                                  "looped_over_batched": looped / batched})
    preview_sheet([shape.mesh for shape in outputs[0].shapes], {"text": PROMPT}, columns=args.samples).save(args.out / "samples.png")

    # View prior and SDS refinement of a sample's latent.
    prior_config = load_config(view_prior.ViewPriorConfig, args.config, "view_prior")
    prior_config.data.shards, prior_config.train.output_dir = str(data), str(args.out / "view_prior")
    prior_dir, values = trained(view_prior.train, prior_config, args.seconds, device)
    report("view prior", values)
    prior = load_prior(prior_dir, device=device)
    reset_peak(device)
    config = RefineConfig(steps=args.refine_steps, target="latent")  # with the latent's own defaults (anchor 0.03, lr 0.02)
    result = refine(outputs[0].shapes[0].tsdf, prior, PROMPT, config, tau=pipeline.config.tau, vqvae=pipeline.vqvae,
                    latent=outputs[0].latents[0], progress=False)
    report("refine (latent)", {"steps": result.steps, "seconds_per_step": result.seconds_per_step,
                               "grid": int(result.tsdf.shape[0]), "peak_mb": peak_mb(device)})
    print(f"figures: {args.out / 'figures.json'}; samples: {args.out / 'samples.png'}")


if __name__ == "__main__":
    main()

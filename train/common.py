"""The loop skeleton every trainer shares: accelerate set-up, run folder, data stream, checkpoints and
resume, EMA, logging, and the non-finite-loss stop.

A trainer (train/vqvae.py, train/ldm.py) reads top to bottom: `Run(...)` → build the model →
`run.prepare` (optimizer, schedule, EMA, resume) → `run.batches` → for each of `run.steps()`: its
loss, `run.update`, `run.ema.step`, `run.log` → `run.save_model` → `run.finish`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from shapekiln.config import to_dict
from shapekiln.data_prep.reader import ShapeShards, check_dataset, list_shards, make_loader
from shapekiln.data_prep.shards import write_atomic
from shapekiln.errors import ShapekilnError, first_line


@dataclass
class DataConfig:
    """Where the training shards are and how they are batched (per process)."""

    shards: str = "runs/quickstart/data"  # a prepared directory, a glob, or several joined by commas (mixed in training)
    batch_size: int = 8
    num_workers: int = 0
    shuffle_buffer: int = 256


@dataclass
class TrainConfig:
    """Optimization, precision, logging and checkpointing; shared by every trainer."""

    output_dir: str = "runs/train"
    max_steps: int = 1000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "constant_with_warmup", "linear"] = "cosine"
    grad_clip: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 10
    image_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"  # accelerate's trackers (`--report-to`)

    def validate(self) -> None:
        if self.max_steps < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("max_steps and gradient_accumulation_steps must be at least 1")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ValueError("lr must be positive and ema_decay in [0, 1)")
        if min(self.log_every, self.image_every, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise ValueError("log_every, image_every, checkpoint_every and keep_checkpoints must be at least 1")


class TrainState:
    """The step counter, saved and restored with accelerate's state (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def resolve_mixed_precision(requested: str, on_cpu: bool) -> str:
    """The precision a run can use: bf16 on a CPU only where it has native bf16 instructions.

    On a CPU without them (AVX2 only) bf16 autocast emulates every Conv3d: one step of the small
    VQ-VAE took 21 s instead of 0.27 s in fp32; with them (AVX512-BF16, AMX) it was 2× faster.
    """
    if requested == "bf16" and on_cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "no"
    return requested


def accelerator_present() -> bool:
    """A CUDA (or ROCm) GPU, an Apple MPS device or an Intel XPU that torch can use."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps is not None and mps.is_available())
            or bool(xpu is not None and xpu.is_available()))


def make_accelerator(train: TrainConfig, output_dir: Path) -> Accelerator:
    """An Accelerator that also forms a process group on a CPU-only machine (see GROUND.md); where an
    accelerator exists (CUDA, Apple's MPS, Intel's XPU) the device is accelerate's own choice."""
    on_cpu = not accelerator_present()
    if train.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ShapekilnError("--report-to wandb needs the wandb package (pip install wandb)")
    precision = resolve_mixed_precision(train.mixed_precision, on_cpu)
    if precision != train.mixed_precision:
        print(f"mixed_precision {train.mixed_precision} → {precision}: this CPU has no native bf16 "
              f"({torch.backends.cpu.get_cpu_capability()}), where bf16 autocast is many times slower", flush=True)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=None if train.report_to == "none" else train.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # `accelerate launch --cpu --num_processes N` silently starts one process per rank of 1.
        raise ShapekilnError(
            f"WORLD_SIZE is {launched} but this process sees 1 process; on a CPU machine launch with "
            "`accelerate launch --multi_gpu --num_processes N -m shapekiln.train.<model> ...`"
        )
    return accelerator


def parameter_groups(model: torch.nn.Module, part: torch.nn.Module | None, part_lr: float | None) -> list[dict[str, Any]]:
    """Torch parameter groups for `Run.prepare`: the trainable parameters of `part` (a submodule, say a
    conditioning head) at their own `part_lr`, the rest at train.lr; one group when either is None."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if part is None or part_lr is None:
        return [{"params": trainable}]
    inside = {id(parameter) for parameter in part.parameters()}
    return [{"params": [p for p in trainable if id(p) not in inside]},
            {"params": [p for p in trainable if id(p) in inside], "lr": part_lr}]


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in (output_dir / "checkpoints").glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return max(steps)[1] if steps else None


class Run:
    """One training run: accelerator, run folder, state, data stream, checkpoints, logs."""

    def __init__(self, name: str, config: Any, train: TrainConfig, resume: str | None = None, progress: bool = True,
                 time_limit: float | None = None):
        self.name, self.config, self.train, self.progress, self.time_limit = name, config, train, progress, time_limit
        self.output_dir = Path(train.output_dir)
        self.accelerator = make_accelerator(train, self.output_dir)
        self.state = TrainState()
        self.resume_from = self._resume_path(resume)
        if self.accelerator.is_main_process:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(self.output_dir / "config.yaml", yaml.safe_dump(_plain(to_dict(config)), sort_keys=False).encode())
            except OSError as error:
                raise ShapekilnError(f"cannot write to output directory {self.output_dir}: {error.strerror or error}") from None
        self.accelerator.wait_for_everyone()
        set_seed(train.seed, device_specific=True)
        self.ema: EMAModel | None = None
        self.last_checkpoint: Path | None = self.resume_from
        self._bar: tqdm | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _resume_path(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        path = latest_checkpoint(self.output_dir) if resume == "latest" else Path(resume)
        if path is None:
            raise ShapekilnError(f"--resume latest: no checkpoint in {self.output_dir / 'checkpoints'}")
        if not (path / "custom_checkpoint_0.pkl").exists():
            raise ShapekilnError(f"--resume {resume}: {path} is not a checkpoint folder of this trainer")
        return path

    def prepare(self, model: torch.nn.Module, parameters: list[torch.nn.Parameter] | list[dict[str, Any]] | None = None):
        """Optimizer, LR schedule and EMA for `model`; everything registered for save_state. `parameters`:
        the trainable ones (default: all that require grad), or torch parameter groups (dicts with
        "params" and optionally their own "lr"; the schedule scales every group alike)."""
        train = self.train
        parameters = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
        # The prepared scheduler steps once per process per optimizer step, so scale its horizon.
        processes = self.accelerator.num_processes
        scheduler = get_scheduler(
            train.lr_schedule, optimizer, num_warmup_steps=train.warmup_steps * processes,
            num_training_steps=train.max_steps * processes,
        )
        self.ema = EMAModel(model.parameters(), decay=train.ema_decay, foreach=True)  # one fused update, not a Python loop over tensors
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.ema.to(self.device)
        self.accelerator.register_for_checkpointing(self.state, self.ema)
        if self.resume_from is not None:
            try:
                self.accelerator.load_state(str(self.resume_from))
            except (RuntimeError, KeyError, ValueError) as error:
                raise ShapekilnError(f"cannot resume from {self.resume_from}: it was saved by another model or config ({first_line(error)})") from None
            if self.is_main:
                print(f"resumed from {self.resume_from} at step {self.state.step}")
        if self.is_main:
            self.accelerator.init_trackers(self.name, config=_flat(to_dict(self.config)))
        return model, optimizer, scheduler

    def batches(self, data: DataConfig, resolution: int, tau: float, **reader_options) -> Iterator[dict[str, Any]]:
        """An endless, seeded stream of this rank's training batches that a resume positions without replaying it.

        The stream is cut into segments of checkpoint_every optimizer steps; each segment is read from
        a fresh shuffle with a seed of its own (train.seed, segment). A run resumed at step s starts
        segment s // checkpoint_every and skips only the batches of its first s mod checkpoint_every
        steps (none at a checkpoint; a time-limit stop may fall between), so a resume at step 300,000
        starts as fast as a fresh run and still sees exactly the batches the uninterrupted run would
        have seen. `self.skipped_batches` says how many it skipped.
        """
        check_dataset(data.shards, resolution, tau)
        shards = list_shards(data.shards, "train")
        per_segment = self.train.checkpoint_every * self.train.gradient_accumulation_steps
        segment, skip = divmod(self.state.step * self.train.gradient_accumulation_steps, per_segment)
        self.skipped_batches = skip

        def segment_batches(segment: int, skip: int) -> Iterator[dict[str, Any]]:
            """Segment `segment`'s loader, its first `skip` batches read and dropped."""
            seed = int(np.random.SeedSequence([self.train.seed, segment]).generate_state(1)[0])
            dataset = ShapeShards(shards, shuffle_buffer=data.shuffle_buffer, seed=seed, repeat=True, resolution=resolution,
                                  rank=self.accelerator.process_index, world_size=self.accelerator.num_processes, **reader_options)
            # important! creating a DataLoader iterator draws a seed from torch's global RNG; keep that draw
            # (and the skip) off the RNG that load_state restored, or a resumed run drifts.
            with torch.random.fork_rng(devices=[]):
                iterator = iter(make_loader(dataset, batch_size=data.batch_size, num_workers=data.num_workers, drop_last=True))
                for _ in range(skip):
                    next(iterator)
            return iterator

        def stream() -> Iterator[dict[str, Any]]:
            nonlocal segment, skip
            while True:
                iterator = segment_batches(segment, skip)
                for _ in range(per_segment - skip):
                    yield next(iterator)
                del iterator  # its worker processes end with it
                segment, skip = segment + 1, 0

        return stream()

    def steps(self) -> Iterator[int]:
        """Optimizer steps from the current one to max_steps, with a progress bar on the main process.

        With a time limit the run also stops, checkpointed, once that many seconds have passed
        (any rank's clock decides for all, so every rank stops at the same step); `--resume latest` continues it.
        """
        self._bar = tqdm(total=self.train.max_steps, initial=self.state.step, desc=self.name, unit="step", disable=not (self.is_main and self.progress))
        self._started, self._started_step = time.perf_counter(), self.state.step
        while self.state.step < self.train.max_steps:
            yield self.state.step
            self.state.step += 1
            self._bar.update(1)
            out_of_time = self._out_of_time()
            if out_of_time or self.state.step % self.train.checkpoint_every == 0 or self.state.step == self.train.max_steps:
                self.save_checkpoint()
            if out_of_time:
                if self.is_main:
                    print(f"{self.name}: time limit of {self.time_limit / 60:.1f} min reached at step {self.state.step} of {self.train.max_steps}")
                break
        self._bar.close()

    def _out_of_time(self) -> bool:
        if self.time_limit is None:
            return False
        over = time.perf_counter() - self._started > self.time_limit
        if self.accelerator.num_processes == 1:
            return over  # no device tensor: one process needs no agreement, and its steps need no synchronization
        flag = torch.tensor([over], dtype=torch.float32, device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def update(self, loss: torch.Tensor, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        """One micro-step inside `accelerator.accumulate(model)`: check the loss, backpropagate,
        clip when gradients sync, step the optimizer and the learning-rate schedule."""
        self.check_finite(loss)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(model.parameters(), self.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop every rank together, before the update, if any rank's loss is NaN or infinite."""
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.accelerator.gather(finite).min() < 1:
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved yet"
            self.accelerator.end_training()
            raise ShapekilnError(
                f"the loss became NaN or infinite at step {self.state.step}; the run stopped before updating the weights and "
                f"{kept}. Lower train.lr or raise train.warmup_steps, then --resume latest"
            )

    def log(self, values: dict[str, float | torch.Tensor], samples_per_step: int) -> None:
        """Scalars to TensorBoard every log_every steps, and the progress bar's postfix.

        Values may be 0-d tensors: they are read (a host-device synchronization each) only on the
        steps that log, so the steps between queue their work without waiting for the accelerator.
        """
        step = self.state.step
        if step % self.train.log_every and step != self.train.max_steps - 1:
            return
        # Tensors are averaged over the processes (every rank logs on the same steps), so the logged loss is the run's.
        values = {key: float(self.accelerator.reduce(value.detach().float(), reduction="mean")) if torch.is_tensor(value)
                  else float(value) for key, value in values.items()}
        elapsed = time.perf_counter() - self._started
        rate = (step + 1 - self._started_step) / elapsed if elapsed > 0 else 0.0
        values = {**values, "steps_per_second": rate, "samples_per_second": rate * samples_per_step}
        self.accelerator.log(values, step=step)
        if self._bar is not None:
            self._bar.set_postfix({key: f"{value:.4g}" for key, value in values.items() if key in ("loss", "samples_per_second")})

    def wants_images(self) -> bool:
        return self.is_main and (self.state.step % self.train.image_every == 0 or self.state.step == self.train.max_steps - 1)

    def log_image(self, tag: str, image: Any) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (when it is one of the trackers)."""
        if self.train.report_to not in ("tensorboard", "all"):
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(tag, image, self.state.step, dataformats="HWC")

    def save_checkpoint(self) -> None:
        """accelerate's full state into checkpoints/step-N (written under a temporary name, then renamed)."""
        final = self.output_dir / "checkpoints" / f"step-{self.state.step:07d}"
        temporary = final.with_name(final.name + ".tmp")
        if self.is_main and temporary.exists():
            shutil.rmtree(temporary)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary))  # every rank takes part
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)
            for old in sorted((self.output_dir / "checkpoints").glob("step-???????"))[: -self.train.keep_checkpoints]:
                shutil.rmtree(old)
        self.last_checkpoint = final
        self.accelerator.wait_for_everyone()

    def save_model(self, model: torch.nn.Module, subdir: str = "model",
                   save: Callable[[torch.nn.Module, Path], Any] | None = None) -> Path:
        """The EMA weights as a self-describing folder, written under a temporary name and renamed.

        `save(unwrapped_model, folder)` writes the folder; by default `save_pretrained` (config.json + safetensors).
        """
        target = self.output_dir / subdir
        self.accelerator.wait_for_everyone()
        if self.is_main:
            unwrapped = self.accelerator.unwrap_model(model)
            self.ema.store(unwrapped.parameters())
            self.ema.copy_to(unwrapped.parameters())
            temporary = target.with_name(target.name + ".tmp")
            if temporary.exists():
                shutil.rmtree(temporary)
            try:
                (save or (lambda module, folder: module.save_pretrained(str(folder))))(unwrapped, temporary)
            finally:
                self.ema.restore(unwrapped.parameters())
            if target.exists():
                shutil.rmtree(target)
            temporary.rename(target)
        self.accelerator.wait_for_everyone()
        return target

    def finish(self) -> None:
        # Without this barrier, two-process runs hung at exit in several trials (GROUND.md).
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        # Let a later run in this process (the quickstart trains two models) choose its own mixed
        # precision; the process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)


def _plain(value: Any) -> Any:
    """Tuples → lists so the saved YAML loads back with safe_load."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat scalars for TensorBoard's hparams."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat

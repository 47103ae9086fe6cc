"""The `shapekiln` command: a thin layer over the library; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from shapekiln.errors import ShapekilnError
from shapekiln.train.options import add_train_arguments, apply_train_arguments, time_limit_seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ShapekilnError as error:
        print(f"shapekiln: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shapekiln: interrupted; finished shards are kept and a rerun resumes", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapekiln", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser("prep", help="meshes → TSDF grids, views, captions, webdataset shards")
    prep.add_argument("source", choices=["synthetic", "procedural", "folder", "objaverse"],
                      help="where shapes come from (procedural: the varied corpus the general VQ-VAE is trained on)")
    prep.add_argument("path", nargs="?", type=Path, help="folder: the directory of meshes")
    prep.add_argument("--out", type=Path, required=True, help="output directory for shards")
    _add_prep_options(prep)
    group = prep.add_argument_group("synthetic and procedural")
    group.add_argument("--count", type=int, default=200, help="number of shapes (default 200)")
    group.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    group.add_argument("--detail", type=int, default=64, help="procedural: the grid its solids are meshed on (default 64)")
    group.add_argument("--part-voxels", type=float, default=2.5,
                       help="thinnest part width in voxels of the grid (default 2.5, so legs and poles stay whole through the VQ-VAE; 0: nominal proportions)")
    group = prep.add_argument_group("folder and objaverse")
    group.add_argument("--captions", type=Path, help="caption CSV (folder: modelId,description[,category]; objaverse: uid,caption)")
    group = prep.add_argument_group("objaverse")
    group.add_argument("--cache-dir", type=Path, help="objaverse cache (default: the package's, ~/.objaverse/hf-objaverse-v1)")
    group.add_argument("--uids", help="comma-separated uids, or @FILE with one uid per line")
    group.add_argument("--lvis", help="comma-separated LVIS categories to keep")
    group.add_argument("--limit", type=int, help="keep the first N uids")
    prep.set_defaults(run=_run_prep)

    show = commands.add_parser("show", help="write a PNG contact sheet of a prepared dataset")
    show.add_argument("data", type=Path, help="directory of shards")
    show.add_argument("--split", default="train")
    show.add_argument("--count", type=int, default=6, help="shapes to show (default 6)")
    show.add_argument("--out", type=Path, help="PNG path (default DATA/preview.png)")
    show.set_defaults(run=_run_show)

    train = commands.add_parser("train", help="train a model (one process; `accelerate launch -m shapekiln.train.<model>` for more)")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    vqvae = models.add_parser("vqvae", help="the VQ-VAE on TSDF shards")
    add_train_arguments(vqvae, "vqvae")
    vqvae.set_defaults(run=_run_train_vqvae)

    ldm = models.add_parser("ldm", help="the latent diffusion model on latent shards (from `shapekiln encode`)")
    add_train_arguments(ldm, "ldm")
    ldm.add_argument("--vqvae", help="the VQ-VAE folder the latents were encoded with, or general-32 (the one shipped; overrides vqvae)")
    ldm.set_defaults(run=_run_train_ldm)

    view_prior = models.add_parser("view-prior", help="the view prior (2D text-to-image diffusion for SDS) on the shards' views")
    add_train_arguments(view_prior, "view_prior")
    view_prior.set_defaults(run=_run_train_view_prior)

    sample = commands.add_parser("sample", help="generate shapes from text and/or an image")
    sample.add_argument("--ckpt", type=Path, required=True, help="saved pipeline folder (RUN/pipeline)")
    sample.add_argument("--text", help="the prompt")
    sample.add_argument("--image", type=Path, help="an image of the object (PNG, JPEG, ...)")
    sample.add_argument("--w-text", type=float, help="text guidance weight (default: the pipeline's, 3)")
    sample.add_argument("--w-image", type=float, help="image guidance weight")
    sample.add_argument("--refine-steps", type=int, default=0, help="then refine each shape toward --text with this many SDS steps (default 0: no refinement)")
    sample.add_argument("--negative-text", help="with --refine-steps: a prompt the refinement moves away from, in place of the empty text")
    sample.add_argument("--prior", type=Path, help="2D prior for --refine-steps: a view-prior folder or a local Stable Diffusion folder (default: CKPT/view_prior)")
    _add_sampling_options(sample)
    sample.set_defaults(run=_run_sample)

    refine = commands.add_parser("refine", help="refine a shape toward a prompt by Score Distillation Sampling with a 2D diffusion prior")
    refine.add_argument("input", type=Path, help="the shape: a TSDF .npy (as `sample` writes them) or a mesh in [-1, 1]³")
    refine.add_argument("--text", help="the prompt (without it: unconditional SDS)")
    refine.add_argument("--negative-text", help="a prompt to move away from, in place of the empty text (say, what the shape is now)")
    refine.add_argument("--prior", type=Path, help="a view-prior folder (`train view-prior`) or a local Stable Diffusion folder (default: CKPT/view_prior)")
    refine.add_argument("--steps", type=int, default=300, help="SDS steps (default 300)")
    refine.add_argument("--ckpt", type=Path, help="a pipeline folder: its VQ-VAE for --target latent, its view_prior/ when --prior is not given")
    refine.add_argument("--vqvae", type=Path, help="a VQ-VAE folder for --target latent")
    refine.add_argument("--target", choices=["grid", "latent"], help="optimize the shape's VQ-VAE latent (the default when --ckpt or --vqvae gives a VQ-VAE) or a residual TSDF grid (the default without one)")
    refine.add_argument("--no-color", action="store_true", help="optimize the shape only (default: also an albedo grid, written as vertex colors)")
    refine.add_argument("--guidance", type=float, help="classifier-free guidance weight (default 20)")
    refine.add_argument("--lr", type=float, help="learning rate (default 0.005 for a grid, 0.02 for a latent)")
    refine.add_argument("--views", type=int, help="random views per step (default 2)")
    refine.add_argument("--anchor", type=float, help="weight of the distance to the starting shape (default 0.03 for a latent, 0.3 for a grid)")
    refine.add_argument("--resolution", type=int, default=32, help="grid size for a mesh input without a VQ-VAE (default 32)")
    refine.add_argument("--tau", type=float, default=0.2, help="truncation of the grid (default 0.2)")
    refine.add_argument("--normalize", action="store_true", help="fit a mesh input into [-1, 1]³ as data preparation does")
    refine.add_argument("--seed", type=int, default=0)
    refine.add_argument("--out", type=Path, default=Path("refined"), help="output directory (default refined/)")
    refine.add_argument("--formats", default="obj,glb,ply", help="mesh formats to write (default obj,glb,ply)")
    refine.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    refine.add_argument("--no-progress", action="store_true")
    refine.set_defaults(run=_run_refine)

    complete = commands.add_parser("complete", help="complete a partial shape (mesh, point cloud or TSDF .npy)")
    complete.add_argument("input", type=Path, help="the partial shape: a mesh, a point cloud (.ply/.xyz) or a TSDF .npy")
    complete.add_argument("--ckpt", type=Path, required=True, help="saved pipeline folder (RUN/pipeline)")
    complete.add_argument("--keep", default="z<0", help="known region: a half-space (z<0, x>0.1), box:x0,y0,z0,x1,y1,z1, or observed (point clouds); default z<0")
    complete.add_argument("--normalize", action="store_true", help="fit the input into [-1, 1]³ as data preparation does")
    complete.add_argument("--mode", choices=["learned", "inpaint"], default="learned", help="learned partial condition (default) or SDFusion's training-free latent inpainting")
    complete.add_argument("--text", help="also condition on a prompt")
    complete.add_argument("--w-partial", type=float, help="partial-shape guidance weight")
    complete.add_argument("--w-text", type=float, help="text guidance weight")
    _add_sampling_options(complete)
    complete.set_defaults(run=_run_complete)

    evaluate = commands.add_parser("eval", help="evaluate a trained model on prepared shards")
    models = evaluate.add_subparsers(dest="model", required=True, metavar="MODEL")
    vqvae = models.add_parser("vqvae", help="reconstruction IoU, Chamfer, F-score and codebook use")
    vqvae.add_argument("--ckpt", type=Path, required=True, help="saved VQ-VAE folder (RUN/model)")
    vqvae.add_argument("--data", type=Path, required=True, help="prepared shard directory")
    vqvae.add_argument("--split", default="test", choices=["train", "val", "test"], help="default test")
    vqvae.add_argument("--batch-size", type=int, default=8)
    vqvae.add_argument("--points", type=int, default=32768, help="surface points per shape for Chamfer and F-score (default 32768)")
    vqvae.add_argument("--limit", type=int, help="evaluate only the first N shapes")
    vqvae.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    vqvae.add_argument("--no-progress", action="store_true")
    vqvae.set_defaults(run=_run_eval_vqvae)

    ev = models.add_parser("ldm", help="generation MMD/COV/1-NNA-CD, text-attribute accuracy, completion UHD/TMD, image IoU/Chamfer")
    ev.add_argument("--ckpt", type=Path, required=True, help="saved pipeline folder (RUN/pipeline)")
    ev.add_argument("--data", type=Path, required=True, help="prepared TSDF or latent shard directory")
    ev.add_argument("--classifier", type=Path, help="attribute classifier folder (eval train-classifier); without it text-attribute accuracy is skipped")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "test+val"],
                    help="held-out shapes to score against (default test; test+val: both, test first)")
    ev.add_argument("--count", type=int, default=32, help="held-out shapes for MMD/COV/1-NNA (0 skips)")
    ev.add_argument("--prompts", type=int, default=20, help="attribute prompts for text accuracy")
    ev.add_argument("--samples-per-prompt", type=int, default=2)
    ev.add_argument("--completion-count", type=int, default=8, help="held-out shapes to complete")
    ev.add_argument("--completions", type=int, default=4, help="completions per shape (TMD)")
    ev.add_argument("--image-count", type=int, default=8, help="held-out views for image conditioning")
    ev.add_argument("--points", type=int, default=2048, help="surface points per shape")
    ev.add_argument("--steps", type=int)
    ev.add_argument("--scheduler", choices=["ddim", "dpm++", "ddpm"], default="ddim")
    ev.add_argument("--guidance", type=float, help="weight for every given modality (default: the pipeline's)")
    ev.add_argument("--generation", choices=["text", "unconditional"], default="text")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device")
    ev.add_argument("--out", type=Path, help="also write the metrics to this JSON file")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(run=_run_eval_ldm)

    classifier = models.add_parser("train-classifier", help="train the attribute classifier on a prepared synthetic dataset")
    classifier.add_argument("--data", type=Path, required=True, help="prepared synthetic TSDF shards")
    classifier.add_argument("--out", type=Path, required=True, help="folder for the classifier")
    classifier.add_argument("--steps", type=int, default=600)
    classifier.add_argument("--batch-size", type=int, default=32)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.add_argument("--no-progress", action="store_true")
    classifier.set_defaults(run=_run_eval_train_classifier)

    encode = commands.add_parser("encode", help="TSDF shards → latent shards with a trained VQ-VAE")
    encode.add_argument("--vqvae", type=Path, required=True, help="saved VQ-VAE folder (RUN/model), or general-32 (the one shipped)")
    encode.add_argument("--data", type=Path, required=True, help="prepared shard directory")
    encode.add_argument("--out", type=Path, required=True, help="directory for the latent shards")
    encode.add_argument("--batch-size", type=int, default=16)
    encode.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    encode.add_argument("--no-progress", action="store_true")
    encode.set_defaults(run=_run_encode)

    quick = commands.add_parser("quickstart", help="from nothing to text-conditioned shapes: data, VQ-VAE, latents, diffusion, samples")
    quick.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="default runs/quickstart")
    quick.add_argument("--count", type=int, default=1000, help="synthetic shapes (default 1000)")
    quick.add_argument("--workers", type=int, default=2, help="prep processes (default 2)")
    quick.add_argument("--vqvae", help="the VQ-VAE to encode with: a folder, general-32 (shipped; the default at the small config) "
                                       "or train (train one on the data; the default at tiny)")
    quick.add_argument("--vqvae-steps", type=int, default=1600, help="VQ-VAE training steps with --vqvae train (default 1600)")
    quick.add_argument("--ldm-steps", type=int, help="diffusion training steps (default: configs/ldm/small.yaml, 800)")
    quick.add_argument("--samples", type=int, default=4, help="shapes per prompt (default 4)")
    quick.add_argument("--config", choices=["tiny", "small"], default="small",
                       help="size of every stage (configs/*/CONFIG.yaml; default small; tiny: 16³, a quick check)")
    quick.add_argument("--no-progress", action="store_true")
    quick.set_defaults(run=_run_quickstart)
    return parser


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=4, help="number of shapes (default 4)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--scheduler", choices=["ddim", "dpm++", "ddpm"], help="sampler (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("samples"), help="output directory (default samples/)")
    parser.add_argument("--formats", default="obj,glb,ply", help="mesh formats to write (default obj,glb,ply)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true")


def _device(args: argparse.Namespace) -> str:
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ShapekilnError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShapekilnError(f"--device {name}: torch sees no CUDA device on this machine")
    return name


def _add_prep_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("processing (override the config)")
    group.add_argument("--config", default="small", help="tiny, small, paper or a .yaml path (configs/data/; default small)")
    group.add_argument("--resolution", type=int, help="TSDF grid size R (R³ voxels)")
    group.add_argument("--tau", type=float, help="truncation distance")
    group.add_argument("--views", type=int, help="rendered views per shape")
    group.add_argument("--view-size", type=int, help="view width and height in pixels")
    group.add_argument("--shard-size", type=int, help="shapes per shard")
    group.add_argument("--max-faces", type=int, help="face limit per mesh")
    group.add_argument("--over-face-limit", choices=["decimate", "skip"], help="what to do with a mesh over the limit")
    group.add_argument("--thin-shell", type=float, help="shell thickness in voxels given to open sheets (0: off; default 1.5)")
    group = parser.add_argument_group("running")
    group.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    group.add_argument("--num-shards", type=int, default=1, help="split the job into this many slices (array jobs)")
    group.add_argument("--shard-index", type=int, default=0, help="which slice this process writes, 0-based")
    group.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_prep(args: argparse.Namespace) -> int:
    from shapekiln.config import load_config
    from shapekiln.data_prep.process import PrepConfig
    from shapekiln.data_prep.shards import run_prep

    overrides = {
        "resolution": args.resolution, "tau": args.tau, "views": args.views, "view_size": args.view_size,
        "shard_size": args.shard_size, "max_faces": args.max_faces, "over_face_limit": args.over_face_limit,
        "thin_shell": args.thin_shell,
    }
    config = load_config(PrepConfig, args.config, "data", overrides)
    source, source_args = _build_source(args, config)
    summary = run_prep(
        source, config, args.out, workers=args.workers, num_shards=args.num_shards, shard_index=args.shard_index,
        progress=not args.no_progress, source_args=source_args,
    )
    print(summary.line(args.out))
    if args.preview:
        print(f"preview: {_write_preview(args.out, 'train', 6, args.out / 'preview.png')}")
    return 0


def _build_source(args: argparse.Namespace, config: Any) -> tuple[Any, dict[str, Any]]:
    """The source object and the arguments that define it (recorded in dataset.json)."""
    if args.source in ("synthetic", "procedural") and args.count < 1:
        raise ShapekilnError(f"--count must be at least 1, got {args.count}")
    if args.source == "synthetic":
        from shapekiln.data_prep.sources.synthetic import SyntheticSource

        source = SyntheticSource.for_config(args.count, config, seed=args.seed, part_voxels=args.part_voxels)
        return source, source.args()
    if args.source == "procedural":
        from shapekiln.data_prep.sources.procedural import ProceduralSource

        source = ProceduralSource(args.count, seed=args.seed, detail=args.detail)
        return source, source.args()
    if args.source == "folder":
        from shapekiln.data_prep.sources.folder import FolderSource

        if args.path is None:
            raise ShapekilnError("prep folder needs the directory of meshes: shapekiln prep folder DIR --out OUT")
        source_args = {"root": str(args.path.resolve()), "captions": str(args.captions) if args.captions else None}
        return FolderSource(args.path, captions_csv=args.captions), source_args
    from shapekiln.data_prep.sources.objaverse import ObjaverseSource

    uids = _read_list(args.uids)
    lvis = [name.strip() for name in args.lvis.split(",") if name.strip()] if args.lvis else None
    source = ObjaverseSource(cache_dir=args.cache_dir, uids=uids, lvis_categories=lvis, captions_csv=args.captions, limit=args.limit)
    source_args = {
        "cache_dir": str(args.cache_dir) if args.cache_dir else None, "uids": uids, "lvis": lvis,
        "captions": str(args.captions) if args.captions else None, "limit": args.limit,
    }
    return source, source_args


def _read_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as error:
            raise ShapekilnError(f"cannot read uid list {path}: {error.strerror}") from None
    return [uid.strip() for uid in value.split(",") if uid.strip()]


def _run_show(args: argparse.Namespace) -> int:
    out = args.out or args.data / "preview.png"
    print(f"preview: {_write_preview(args.data, args.split, args.count, out)}")
    return 0


def _structure_line(data: Path, grids: list, ids: list[str]) -> str:
    """One line on whether the shown shapes hold together: one-piece fraction, floaters, thin parts present."""
    from shapekiln.evaluate import DatasetParts, structure_figures

    dataset_parts = DatasetParts.for_data(data)
    parts = None if dataset_parts is None else [dataset_parts.masks(shape_id) for shape_id in ids]
    figures = structure_figures(grids, parts, "shown")
    line = (f"structure: {round(figures['shown_one_piece'] * len(grids))} of {len(grids)} shown shapes are one piece "
            f"(mean {figures['shown_pieces_mean']:.2f} pieces, {100 * figures['shown_floaters_mean']:.1f}% of the inside in floaters)")
    if "shown_thin_parts_present" in figures:
        line += f"; thin parts present {100 * figures['shown_thin_parts_present']:.1f}% of {figures['shown_thin_parts']}"
    return line


def _write_preview(data: Path, split: str, count: int, out: Path) -> Path:
    import itertools

    from shapekiln.data_prep.preview import contact_sheet
    from shapekiln.data_prep.reader import ShapeShards, list_shards

    dataset = ShapeShards(list_shards(data, split), views=True)
    samples = []
    for sample in itertools.islice(dataset, count):
        samples.append({
            "id": sample["id"],
            "caption": sample["captions"][0],
            "views": sample["views"].permute(0, 2, 3, 1).numpy(),  # (K, H, W, 4)
            "tsdf": sample["tsdf"][0].numpy(),
        })
    if samples:
        print(_structure_line(data, [sample["tsdf"] for sample in samples], [sample["id"] for sample in samples]))
    try:
        return contact_sheet(samples, out)
    except OSError as error:
        raise ShapekilnError(f"cannot write {out}: {error.strerror or error}") from None


def _run_train_vqvae(args: argparse.Namespace) -> int:
    from shapekiln.config import load_config
    from shapekiln.train.vqvae import VQVAEConfig, train

    config = apply_train_arguments(load_config(VQVAEConfig, args.config, "vqvae"), args)
    train(config, resume=args.resume, progress=not args.no_progress, time_limit=time_limit_seconds(args))
    return 0


def _run_train_ldm(args: argparse.Namespace) -> int:
    from shapekiln.train.ldm import config_from_args, train

    train(config_from_args(args), resume=args.resume, progress=not args.no_progress, time_limit=time_limit_seconds(args))
    return 0


def _run_train_view_prior(args: argparse.Namespace) -> int:
    from shapekiln.train.view_prior import config_from_args, train

    train(config_from_args(args), resume=args.resume, progress=not args.no_progress, time_limit=time_limit_seconds(args))
    return 0


def _check_sampling_args(args: argparse.Namespace) -> list[str]:
    """Validate before the slow imports; return the mesh formats."""
    if getattr(args, "n", 1) < 1:
        raise ShapekilnError(f"--n must be at least 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ShapekilnError(f"--steps must be at least 1, got {args.steps}")
    formats = [fmt.strip().lower() for fmt in args.formats.split(",") if fmt.strip()]
    unknown = set(formats) - {"obj", "glb", "ply"}
    if unknown:
        raise ShapekilnError(f"--formats: unknown format {sorted(unknown)[0]!r} (choose from obj, glb, ply)")
    return formats


def _guidance(args: argparse.Namespace, *names: str) -> dict[str, float]:
    return {name: getattr(args, f"w_{name}") for name in names if getattr(args, f"w_{name}", None) is not None}


def _run_sample(args: argparse.Namespace) -> int:
    formats = _check_sampling_args(args)
    if args.text is None and args.image is None:
        print("shapekiln: no --text or --image: sampling unconditionally", file=sys.stderr)
    if args.text is not None and not args.text.strip():
        raise ShapekilnError("--text is empty")
    from shapekiln.sample.export import write_samples
    from shapekiln.sample.pipeline import ShapePipeline, load_image

    if args.refine_steps < 0:
        raise ShapekilnError(f"--refine-steps must not be negative, got {args.refine_steps}")
    if args.negative_text is not None and (not args.refine_steps or args.text is None or not args.negative_text.strip()):
        raise ShapekilnError("--negative-text steers the refinement: it needs --refine-steps and --text, and must not be empty")
    refine = None
    if args.refine_steps:
        from shapekiln.sample.refine import RefineConfig

        refine = RefineConfig(steps=args.refine_steps, seed=args.seed)
        refine.validate()
    image = load_image(args.image) if args.image is not None else None  # a bad image fails before the model loads
    pipeline = ShapePipeline.from_pretrained(args.ckpt, device=_device(args), refine=refine, prior=args.prior)
    output = pipeline(text=args.text, image=image, guidance=_guidance(args, "text", "image"), num_samples=args.n,
                      steps=args.steps, scheduler=args.scheduler, seed=args.seed, progress=not args.no_progress,
                      negative_text=args.negative_text)
    condition = {"text": args.text, "image": _image_array(image)}
    written = write_samples([s.mesh for s in output.shapes], [s.tsdf for s in output.shapes], args.out, condition, formats)
    print(f"sample: {len(output.shapes)} shapes → {args.out} (preview: {args.out / 'preview.png'}, {len(written)} files)")
    stopped = [f"shape {i}: {s.refine_stopped}" for i, s in enumerate(output.shapes) if s.refine_stopped]
    if stopped:
        raise ShapekilnError("refinement stopped early (" + "; ".join(stopped) + "); the files hold the last finite state")
    return 0


def _image_array(image: Any) -> Any:
    if image is None:
        return None
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def _run_complete(args: argparse.Namespace) -> int:
    formats = _check_sampling_args(args)
    if args.text is not None and not args.text.strip():
        raise ShapekilnError("--text is empty")
    from shapekiln.sample.export import write_samples
    from shapekiln.sample.partial import load_partial
    from shapekiln.sample.pipeline import ShapePipeline

    pipeline = ShapePipeline.from_pretrained(args.ckpt, device=_device(args))
    partial = load_partial(args.input, pipeline.config.resolution, pipeline.config.tau, args.keep, args.normalize)
    guidance = _guidance(args, "partial", "text")
    if args.mode == "inpaint" and "partial" in guidance:
        raise ShapekilnError("--w-partial applies to --mode learned; inpainting keeps the known region as it is")
    output = pipeline(text=args.text, partial=partial.tsdf, known_mask=partial.known, guidance=guidance, num_samples=args.n,
                      steps=args.steps, scheduler=args.scheduler, seed=args.seed, completion=args.mode, progress=not args.no_progress)
    import numpy as np

    from shapekiln.data_prep.preview import tsdf_to_mesh

    kept = tsdf_to_mesh(np.where(partial.known, partial.tsdf, pipeline.config.tau))
    condition = {"text": args.text or f"keep {args.keep}", "partial": kept}
    written = write_samples([s.mesh for s in output.shapes], [s.tsdf for s in output.shapes], args.out, condition, formats, prefix="completion")
    print(f"complete: {len(output.shapes)} completions → {args.out} (preview: {args.out / 'preview.png'}, {len(written)} files)")
    return 0


def _run_refine(args: argparse.Namespace) -> int:
    formats = _check_sampling_args(args)
    if args.text is not None and not args.text.strip():
        raise ShapekilnError("--text is empty")
    if args.negative_text is not None and (args.text is None or not args.negative_text.strip()):
        raise ShapekilnError("--negative-text needs --text and must not be empty")
    if args.ckpt is not None and args.vqvae is not None:
        raise ShapekilnError("give --ckpt or --vqvae, not both")
    if args.prior is None and (args.ckpt is None or not (args.ckpt / "view_prior").is_dir()):
        raise ShapekilnError("no prior: give --prior (a folder from `shapekiln train view-prior`, or a Stable Diffusion folder)")
    from shapekiln.sample.refine import RefineConfig, load_shape, refine, write_refined

    config = RefineConfig(steps=args.steps, target=args.target or "auto", color=not args.no_color, lr=args.lr, seed=args.seed,
                          shadings=RefineConfig.shadings_for(not args.no_color))
    for option, name in (("guidance", "guidance"), ("views", "views_per_step"), ("anchor", "anchor_weight")):
        if getattr(args, option) is not None:
            setattr(config, name, getattr(args, option))
    config.validate()

    from shapekiln.models.io import load_pretrained
    from shapekiln.models.priors import load_prior
    from shapekiln.models.vqvae import VQVAE

    device = _device(args)
    vqvae_dir = args.vqvae or (args.ckpt / "vqvae" if args.ckpt is not None else None)
    vqvae = load_pretrained(VQVAE, vqvae_dir).eval() if vqvae_dir is not None else None
    tau = vqvae.config.tau if vqvae is not None else args.tau
    start = load_shape(args.input, vqvae.config.resolution if vqvae is not None else None, tau, args.normalize, args.resolution)
    prior = load_prior(args.prior or args.ckpt / "view_prior", device=device)
    result = refine(start, prior, args.text, config, tau=tau, vqvae=vqvae.to(device) if vqvae is not None else None,
                    log_dir=args.out / "logs", progress=not args.no_progress, negative=args.negative_text)
    written = write_refined(result, args.out, args.text, formats)
    print(f"refine: {result.steps} steps of the {result.config.target} (anchor {result.config.anchor_weight:g}), {result.seconds_per_step:.2f} s/step → {args.out} "
          f"(preview: {args.out / 'preview.png'}, {len(written)} files; loss curve: tensorboard --logdir {args.out / 'logs'})")
    if result.stopped:
        raise ShapekilnError(f"refinement stopped early: {result.stopped}; {args.out} holds that state")
    return 0


def _run_eval_vqvae(args: argparse.Namespace) -> int:
    from shapekiln.evaluate import evaluate_vqvae, format_metrics, write_json

    if min(args.batch_size, args.points) < 1 or (args.limit is not None and args.limit < 1):
        raise ShapekilnError("--batch-size, --points and --limit must be at least 1")
    metrics = evaluate_vqvae(args.ckpt, args.data, args.split, args.batch_size, args.points, args.limit, progress=not args.no_progress)
    print(format_metrics(metrics))
    if args.out:
        print(f"metrics: {write_json(args.out, metrics)}")
    return 0


def _run_eval_ldm(args: argparse.Namespace) -> int:
    from shapekiln.evaluate import evaluate_ldm, format_metrics, write_json

    metrics = evaluate_ldm(args.ckpt, args.data, args.classifier, split=args.split, count=args.count, prompts=args.prompts,
                           samples_per_prompt=args.samples_per_prompt, completion_count=args.completion_count,
                           completions=args.completions, image_count=args.image_count, points=args.points, steps=args.steps,
                           scheduler=args.scheduler, guidance=args.guidance, generation=args.generation, seed=args.seed,
                           device=args.device, progress=not args.no_progress)
    print(format_metrics(metrics))
    if args.out:
        print(f"metrics: {write_json(args.out, metrics)}")
    return 0


def _run_eval_train_classifier(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch_size < 1:
        raise ShapekilnError("--steps and --batch-size must be at least 1")
    from shapekiln.models.attributes import train_attribute_classifier

    out = train_attribute_classifier(args.data, args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                     progress=not args.no_progress)
    print(f"attribute classifier: saved {out} (validation accuracy in {out / 'accuracy.json'})")
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    if args.batch_size < 1:  # before the slow imports
        raise ShapekilnError(f"--batch-size must be at least 1, got {args.batch_size}")
    from shapekiln.data_prep.latents import encode_shards

    summary = encode_shards(args.vqvae, args.data, args.out, args.batch_size, progress=not args.no_progress, device=_device(args))
    print(summary.line(args.out))
    return 0


def _run_quickstart(args: argparse.Namespace) -> int:
    if min(args.count, args.workers, args.vqvae_steps, args.samples, args.ldm_steps or 1) < 1:
        raise ShapekilnError("--count, --workers, --vqvae-steps, --ldm-steps and --samples must be at least 1")
    from shapekiln.quickstart import quickstart

    quickstart(args.out, count=args.count, workers=args.workers, vqvae_steps=args.vqvae_steps, ldm_steps=args.ldm_steps,
               samples_per_prompt=args.samples, progress=not args.no_progress, config=args.config, vqvae=args.vqvae)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line options every trainer shares, kept free of heavy imports so `shapekiln --help` stays fast.

The same options serve `shapekiln train <model> ...` and `accelerate launch -m shapekiln.train.<model> ...`.
"""

from __future__ import annotations

import argparse
from typing import Any

from shapekiln.errors import ShapekilnError


def add_train_arguments(parser: argparse.ArgumentParser, group: str) -> None:
    parser.add_argument("--config", default="small", help=f"tiny, small, paper or a .yaml path (configs/{group}/; default small)")
    parser.add_argument("--data", help="shard directory (overrides data.shards)")
    parser.add_argument("--output-dir", help="run folder (overrides train.output_dir)")
    parser.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    parser.add_argument("--seed", type=int, help="overrides train.seed")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (OUTPUT_DIR/checkpoints/step-N) to continue from")
    parser.add_argument("--time-limit", type=float, metavar="MINUTES", help="also stop (checkpointed) after this many minutes")
    parser.add_argument("--report-to", choices=["tensorboard", "wandb", "all", "none"],
                        help="where to log (accelerate's trackers; overrides train.report_to, default tensorboard)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def apply_train_arguments(config: Any, args: argparse.Namespace) -> Any:
    """Apply the shared overrides to a loaded config with `data` and `train` sections."""
    if args.data:
        config.data.shards = args.data
    if args.output_dir:
        config.train.output_dir = args.output_dir
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ShapekilnError(f"--max-steps must be at least 1, got {args.max_steps}")
        config.train.max_steps = args.max_steps
    if args.seed is not None:
        config.train.seed = args.seed
    if getattr(args, "report_to", None):
        config.train.report_to = args.report_to
    return config


def time_limit_seconds(args: argparse.Namespace) -> float | None:
    if args.time_limit is None:
        return None
    if args.time_limit <= 0:
        raise ShapekilnError(f"--time-limit must be positive, got {args.time_limit}")
    return 60.0 * args.time_limit

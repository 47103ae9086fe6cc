"""TSDF speed and agreement at 64³ on ~20k-face meshes, side by side with two baselines.

Baselines, in the same process on the same meshes:
  * `igl.signed_distance(..., FAST_WINDING_NUMBER)` over the full grid (one direct libigl call);
  * trimesh's `proximity.signed_distance` (timed on a random subset of voxels and scaled to the
    grid, since a full 64³ grid takes minutes).
Agreement is measured against the reference TSDF of GROUND.md: exact unsigned distance
(`igl.point_mesh_squared_distance`) with fast-winding-number signs (`tsdf_reference`).
Also times a whole sample (TSDF + 8 views at 128² + PNG encoding), the per-shape cost of prep.
Times are wall clock; a second table repeats them as process CPU time, the per-core cost even
while other work on the machine stretches the wall clock.

    python bench/prep.py            # pinned to one core (the per-core figures)
    python bench/prep.py --cores all
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import igl
import numpy as np
import trimesh

from shapekiln.config import from_dict
from shapekiln.data_prep.process import PrepConfig, normalize, prepare_sample
from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.data_prep.sources.synthetic import SyntheticSource
from shapekiln.data_prep.tsdf import compute_tsdf, grid_points, is_closed, tsdf_reference

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "meshes"
R, TAU = 64, 0.2


def meshes() -> dict[str, trimesh.Trimesh]:
    """12k-25k faces each; the teapot and the truck are open (not watertight)."""
    found = {}
    for name, file in (("teapot (open)", "teapot.obj"), ("spot cow", "spot.obj"), ("milk truck (open)", "CesiumMilkTruck.glb")):
        if (SHARED / file).exists():
            mesh = trimesh.load(SHARED / file, force="mesh")
            while len(mesh.faces) < 12_000:
                mesh = mesh.subdivide()
            found[name] = mesh
    found["sphere"] = trimesh.creation.icosphere(subdivisions=5)
    chair = trimesh.util.concatenate([
        trimesh.creation.box((1.0, 0.1, 1.0), trimesh.transformations.translation_matrix((0, 0.5, 0))),
        trimesh.creation.box((1.0, 1.0, 0.1), trimesh.transformations.translation_matrix((0, 1.0, -0.45))),
        *[trimesh.creation.cylinder(0.05, 1.0, sections=64, transform=trimesh.transformations.translation_matrix((x, 0.0, z)) @ trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
          for x in (-0.4, 0.4) for z in (-0.4, 0.4)],
    ])
    found["chair (overlapping parts)"] = chair.subdivide().subdivide()  # 16768 faces
    return found


CPU: dict[str, float] = {}  # best process CPU time of the last `timed` call, by label


def timed(fn, repeat: int = 3, label: str = ""):
    """Best wall-clock time of `repeat` runs, and the last result; the best CPU time goes to CPU[label].

    CPU time (this process, pinned to one core) is the per-core cost even when other work on the
    machine stretches the wall clock.
    """
    best, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    CPU[label] = best_cpu
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="1", help="1 (pin to one core, default) or all")
    parser.add_argument("--synthetic", type=int, default=50, help="synthetic shapes timed (mean per shape)")
    parser.add_argument("--trimesh-points", type=int, default=2048, help="voxels timed for the trimesh baseline")
    args = parser.parse_args()
    if args.cores == "1":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cores = len(os.sched_getaffinity(0))
    config = from_dict(PrepConfig, {"resolution": R, "tau": TAU, "views": 8, "view_size": 128, "max_faces": 10**6}, "bench")
    cameras = config.cameras()
    points = grid_points(R)
    rng = np.random.default_rng(0)
    subset = rng.choice(len(points), size=args.trimesh_points, replace=False)

    print(f"TSDF {R}³, tau {TAU}, {cores} core(s); times are best of 3 (trimesh: one run on {args.trimesh_points} voxels, scaled to {R}³)")
    header = (f"{'mesh':26} {'faces':>6} {'closed':>6} | {'ours s':>7} {'igl.sd s':>8} {'ref s':>6} {'trimesh s':>9} | "
              f"{'vs igl.sd':>9} {'vs trimesh':>10} | {'max|Δ| band':>11} {'sign≠':>6} {'igl.sd max|Δ|':>13} {'trimesh sign≠':>13} | {'sample s':>8}")
    print(header)
    print("-" * len(header))
    ratios, cpu_rows = [], []
    for name, raw in meshes().items():
        mesh, _ = normalize(raw, 0.8)
        vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
        faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
        ours_s, ours = timed(lambda: compute_tsdf(vertices, faces, R, TAU), label="ours")
        igl_s, (igl_sd, *_) = timed(lambda: igl.signed_distance(points, vertices, faces, sign_type=igl.SIGNED_DISTANCE_TYPE_FAST_WINDING_NUMBER), label="igl")
        ref_s, reference = timed(lambda: tsdf_reference(vertices, faces, R, TAU), repeat=1)
        start = time.perf_counter()
        trimesh_sd = trimesh.proximity.signed_distance(mesh, points[subset])  # positive inside
        trimesh_s = (time.perf_counter() - start) * len(points) / len(subset)
        sample_s, _ = timed(lambda: prepare_sample(ShapeRecord("bench", raw, ["bench"]), config, cameras), label="sample")
        cpu_rows.append((name, CPU["ours"], CPU["igl"], CPU["sample"]))

        band = np.abs(reference) < TAU
        max_diff = float(np.abs(ours - reference)[band].max())
        sign_mismatch = int(((ours < 0) != (reference < 0)).sum())
        igl_diff = float(np.abs(np.clip(igl_sd, -TAU, TAU).reshape(R, R, R) - reference)[band].max())
        trimesh_mismatch = int(((trimesh_sd > 0) != (reference.reshape(-1)[subset] < 0)).sum())
        ratios.append((igl_s / ours_s, trimesh_s / ours_s))
        print(f"{name:26} {len(faces):>6} {str(is_closed(vertices, faces)):>6} | {ours_s:>7.3f} {igl_s:>8.3f} {ref_s:>6.3f} {trimesh_s:>9.1f} | "
              f"{igl_s / ours_s:>8.1f}× {trimesh_s / ours_s:>9.0f}× | {max_diff:>11.2e} {sign_mismatch:>6} {igl_diff:>13.2e} {trimesh_mismatch:>6}/{len(subset):<6} | {sample_s:>8.3f}")
    synthetic = SyntheticSource(args.synthetic)
    ours_total = igl_total = sample_total = 0.0
    for item in synthetic.items():
        record = synthetic.load(item)
        mesh, _ = normalize(record.mesh, 0.8)
        vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
        faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
        ours_total += timed(lambda: compute_tsdf(vertices, faces, R, TAU), repeat=1)[0]
        igl_total += timed(lambda: igl.signed_distance(points, vertices, faces, sign_type=igl.SIGNED_DISTANCE_TYPE_FAST_WINDING_NUMBER), repeat=1)[0]
        sample_total += timed(lambda: prepare_sample(record, config, cameras), repeat=1)[0]
    count = args.synthetic
    print(f"{'synthetic set, mean of ' + str(count):26} {'':>6} {'':>6} | {ours_total / count:>7.3f} {igl_total / count:>8.3f} {'':>6} {'':>9} | "
          f"{igl_total / ours_total:>8.1f}× {'':>10} | {'':>11} {'':>6} {'':>13} {'':>13} | {sample_total / count:>8.3f}")
    igl_ratio = np.exp(np.mean(np.log([r[0] for r in ratios])))
    trimesh_ratio = np.exp(np.mean(np.log([r[1] for r in ratios])))
    print(f"geometric mean speed-up over the 5 meshes: {igl_ratio:.1f}× over igl.signed_distance, {trimesh_ratio:.0f}× over trimesh")
    print("max|Δ| band: ours vs reference inside the band; sign≠: voxels whose sign differs from the reference (of 262144);")
    print("sample s: TSDF + 8 views at 128² + PNG encoding for one shape (the per-shape cost of `shapekiln prep`).")
    print()
    print("The same runs in process CPU time (best of 3 each; unaffected by other work stretching the wall clock):")
    print(f"{'mesh':26} | {'ours cpu s':>10} {'igl.sd cpu s':>12} {'vs igl.sd':>9} | {'sample cpu s':>12}")
    for name, ours_cpu, igl_cpu, sample_cpu in cpu_rows:
        print(f"{name:26} | {ours_cpu:>10.3f} {igl_cpu:>12.3f} {igl_cpu / ours_cpu:>8.1f}× | {sample_cpu:>12.3f}")


if __name__ == "__main__":
    main()

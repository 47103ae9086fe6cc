"""A varied procedural corpus for a general autoencoder: open-ended shapes, not ten categories.

Each shape is an implicit solid (negative inside) built from random parts, then meshed by marching
cubes (PyMCubes) on a `detail`³ grid and kept as its largest piece, so it is one closed, consistently
wound mesh that goes through prep like any mesh of a folder. Families, one per item in turn:

  * ``csg``: unions of boxes, cylinders, spheres, tori, cones and capsules, then differences (holes,
    notches), each part placed touching what is already there;
  * ``tubes``: swept tubes along smooth random curves, on a small hub or alone;
  * ``plates``: thin boards and brackets (furniture-like slabs, fins, L and T profiles);
  * ``blobs``: organic shapes, smooth unions of spheres and ellipsoids (metaball-like);
  * ``shells``: hollow shells of a sphere, box or superquadric, cut open and pierced with holes;
  * ``superquadrics``: superellipsoids and superquadric assemblies, from pinched to boxy.

Every part gets a random rotation and an anisotropic scale; several parts at several scales. The
thinnest part is at least `MIN_THICKNESS` of the [-1, 1] frame the shape is built in, so after prep
normalizes the longest side to 2·extent it is at least about 1.5 voxels at 32³ (see `min_voxels`).
Deterministic per (seed, index). Captions are generic ("a procedural shape of swept tubes"): the corpus is for
the autoencoder, not for text.
"""

from __future__ import annotations

from typing import Callable, Iterator

import mcubes
import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

from shapekiln.data_prep.sources.base import ShapeRecord
from shapekiln.errors import ShapekilnError

FAMILIES = ("csg", "tubes", "plates", "blobs", "shells", "superquadrics")
CAPTIONS = {  # generic: the corpus is for the autoencoder
    "csg": "a procedural solid of joined and cut primitives", "tubes": "a procedural shape of swept tubes",
    "plates": "a procedural shape of thin plates", "blobs": "a procedural organic blob",
    "shells": "a procedural hollow shell with holes", "superquadrics": "a procedural superquadric shape",
}
MIN_THICKNESS = 0.12  # of the [-1, 1] frame: ≥ 0.12 / 2 of the longest side, ≥ 1.5 voxels at 32³ after prep
DOMAIN = 1.0  # parts are built inside [-DOMAIN, DOMAIN]³ (a margin of marching-cube cells stays outside)

Field = Callable[[np.ndarray], np.ndarray]  # (N, 3) points → (N,) values, negative inside


# ----------------------------------------------------------------------------------------------
# Primitives, in their own frame (centered at the origin); `placed` moves and turns them.


def sphere(radius: float) -> Field:
    return lambda p: np.linalg.norm(p, axis=1) - radius


def box(half: np.ndarray, rounding: float = 0.0) -> Field:
    half = np.asarray(half, float) - rounding

    def field(p):
        q = np.abs(p) - half
        return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0) - rounding
    return field


def cylinder(radius: float, half_height: float) -> Field:
    def field(p):
        d = np.stack([np.linalg.norm(p[:, :2], axis=1) - radius, np.abs(p[:, 2]) - half_height], axis=1)
        return np.linalg.norm(np.maximum(d, 0.0), axis=1) + np.minimum(d.max(axis=1), 0.0)
    return field


def cone(bottom: float, top: float, half_height: float) -> Field:
    """A capped cone along z (radius `bottom` at -h, `top` at +h); the zero set is exact, the field is not."""
    def field(p):
        t = np.clip((p[:, 2] + half_height) / (2 * half_height), 0.0, 1.0)
        radial = np.linalg.norm(p[:, :2], axis=1) - (bottom + (top - bottom) * t)
        return np.maximum(radial, np.abs(p[:, 2]) - half_height)
    return field


def torus(major: float, minor: float) -> Field:
    def field(p):
        ring = np.linalg.norm(p[:, :2], axis=1) - major
        return np.sqrt(ring ** 2 + p[:, 2] ** 2) - minor
    return field


def superquadric(half: np.ndarray, e1: float, e2: float) -> Field:
    """Superellipsoid with semi-axes `half` and shape exponents e1 (z) and e2 (xy); scaled by the smallest
    semi-axis so the field is about a distance near the surface."""
    half = np.asarray(half, float)

    def field(p):
        q = np.abs(p) / half + 1e-9
        xy = (q[:, 0] ** (2 / e2) + q[:, 1] ** (2 / e2)) ** (e2 / e1)
        return ((xy + q[:, 2] ** (2 / e1)) ** (e1 / 2) - 1.0) * half.min()
    return field


def tube(points: np.ndarray, radius: float) -> Field:
    """A swept tube: distance to a polyline minus `radius` (capsule ends)."""
    a, b = points[:-1], points[1:]
    ab = b - a
    length2 = np.maximum((ab ** 2).sum(axis=1), 1e-12)

    def field(p):
        best = np.full(len(p), np.inf)
        for start, direction, l2 in zip(a, ab, length2):
            t = np.clip(((p - start) @ direction) / l2, 0.0, 1.0)
            best = np.minimum(best, np.linalg.norm(p - start - t[:, None] * direction, axis=1))
        return best - radius
    return field


def placed(field: Field, center: np.ndarray, rotation: np.ndarray) -> Field:
    """`field` turned by `rotation` (3×3) and moved to `center`."""
    return lambda p: field((p - center) @ rotation)


def union(*fields: Field) -> Field:
    return lambda p: np.min([f(p) for f in fields], axis=0)


def smooth_union(fields: list[Field], k: float) -> Field:
    """Polynomial smooth minimum (blend width k): organic joins."""
    def field(p):
        d = fields[0](p)
        for other in fields[1:]:
            e = other(p)
            h = np.clip(0.5 + 0.5 * (e - d) / k, 0.0, 1.0)
            d = e * (1 - h) + d * h - k * h * (1 - h)
        return d
    return field


def difference(base: Field, *cuts: Field) -> Field:
    return lambda p: np.max([base(p)] + [-cut(p) for cut in cuts], axis=0)


# ----------------------------------------------------------------------------------------------
# Families: each draws a field from `rng`.


def _rotation(rng: np.random.Generator) -> np.ndarray:
    return Rotation.random(random_state=rng).as_matrix()


def _thickness(rng: np.random.Generator, high: float = 0.25) -> float:
    """A thin dimension (full width): from MIN_THICKNESS up to `high`, thin ones more often."""
    return float(MIN_THICKNESS + (high - MIN_THICKNESS) * rng.random() ** 2)


def _primitive(rng: np.random.Generator, scale: float) -> Field:
    """A random solid primitive about `scale` in size (half extent), anisotropic."""
    kind = rng.choice(["box", "cylinder", "sphere", "torus", "cone", "capsule", "superquadric"])
    s = scale * rng.uniform(0.5, 1.0, size=3)
    thin = _thickness(rng) / 2
    if kind == "box":
        return box(np.maximum(s, thin), rounding=float(rng.uniform(0, 0.3)) * max(thin, 0.02))
    if kind == "cylinder":
        return cylinder(max(s[0], thin), max(s[2], thin))
    if kind == "sphere":
        return superquadric(np.maximum(s, thin), 1.0, 1.0)  # an ellipsoid
    if kind == "torus":
        minor = max(thin, 0.3 * s[1])
        return torus(max(s[0], 2.2 * minor), minor)
    if kind == "cone":
        return cone(max(s[0], thin), max(thin, float(rng.uniform(0, 1)) * s[0]), max(s[2], thin))
    if kind == "capsule":
        return tube(np.array([[0, 0, -s[2]], [0, 0, s[2]]]), max(thin, 0.4 * s[0]))
    return superquadric(np.maximum(s, thin), float(rng.uniform(0.2, 1.8)), float(rng.uniform(0.2, 1.8)))


def _anchor(rng: np.random.Generator, field: Field | None, spread: float) -> np.ndarray:
    """A point inside `field` (a new part placed there touches the shape), or near the origin."""
    if field is None:
        return rng.uniform(-0.15, 0.15, size=3)
    candidates = rng.uniform(-spread, spread, size=(512, 3))
    inside = candidates[field(candidates) < 0]
    if len(inside) == 0:
        return np.zeros(3)
    return inside[rng.integers(len(inside))]


def csg(rng: np.random.Generator) -> Field:
    shape = None
    for _ in range(int(rng.integers(2, 6))):
        part = placed(_primitive(rng, float(rng.uniform(0.2, 0.55))), _anchor(rng, shape, 0.7), _rotation(rng))
        shape = part if shape is None else union(shape, part)
    cuts = [placed(_primitive(rng, float(rng.uniform(0.12, 0.35))), _anchor(rng, shape, 0.7), _rotation(rng))
            for _ in range(int(rng.integers(0, 3)))]
    return difference(shape, *cuts) if cuts else shape


def _curve(rng: np.random.Generator, start: np.ndarray, length: float, samples: int = 12) -> np.ndarray:
    """A smooth random curve from `start`: a random walk of directions that turn a little each step."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    points = [start]
    step = length / samples
    for _ in range(samples):
        direction = direction + rng.normal(scale=0.35, size=3)
        direction /= np.linalg.norm(direction)
        points.append(np.clip(points[-1] + step * direction, -0.85, 0.85))
    return np.array(points)


def tubes(rng: np.random.Generator) -> Field:
    parts = []
    hub = None
    if rng.random() < 0.6:
        hub = placed(_primitive(rng, float(rng.uniform(0.15, 0.3))), np.zeros(3), _rotation(rng))
        parts.append(hub)
    for _ in range(int(rng.integers(1, 5))):
        start = _anchor(rng, hub, 0.3) if hub is not None else rng.uniform(-0.2, 0.2, size=3)
        parts.append(tube(_curve(rng, start, float(rng.uniform(0.8, 1.6))), _thickness(rng, 0.3) / 2))
    # Tubes drawn from the same start all touch; without a hub, later tubes start on the first one.
    return union(*parts)


def plates(rng: np.random.Generator) -> Field:
    shape = None
    for k in range(int(rng.integers(2, 6))):
        half = np.array([rng.uniform(0.2, 0.7), rng.uniform(0.15, 0.6), _thickness(rng, 0.2) / 2])
        rotation = _rotation(rng) if rng.random() < 0.5 else _axis_turn(rng)
        center = _anchor(rng, shape, 0.7)
        part = placed(box(half, rounding=float(rng.uniform(0, 0.5)) * half[2]), center, rotation)
        shape = part if shape is None else union(shape, part)
    return shape


def _axis_turn(rng: np.random.Generator) -> np.ndarray:
    """A turn by multiples of 90° (boards meet at right angles, as in furniture and brackets)."""
    return Rotation.from_euler("xyz", rng.integers(0, 4, size=3) * 90, degrees=True).as_matrix()


def blobs(rng: np.random.Generator) -> Field:
    parts, centers = [], [np.zeros(3)]
    for _ in range(int(rng.integers(3, 9))):
        center = np.clip(centers[int(rng.integers(len(centers)))] + rng.normal(scale=0.25, size=3), -0.6, 0.6)
        centers.append(center)
        half = np.maximum(rng.uniform(0.1, 0.35, size=3), MIN_THICKNESS / 2)
        parts.append(placed(superquadric(half, 1.0, 1.0), center, _rotation(rng)))
    return smooth_union(parts, k=float(rng.uniform(0.08, 0.25)))


def shells(rng: np.random.Generator) -> Field:
    half = rng.uniform(0.4, 0.8, size=3)
    kind = rng.choice(["sphere", "box", "superquadric"])
    if kind == "sphere":
        base = superquadric(half, 1.0, 1.0)
    elif kind == "box":
        base = box(half, rounding=float(rng.uniform(0.0, 0.2)))
    else:
        base = superquadric(half, float(rng.uniform(0.3, 1.5)), float(rng.uniform(0.3, 1.5)))
    wall = _thickness(rng, 0.22)
    shell = lambda p: np.abs(base(p)) - wall / 2  # noqa: E731
    cuts = []
    if rng.random() < 0.6:  # cut open: everything above a random plane
        normal = rng.normal(size=3)
        normal /= np.linalg.norm(normal)
        offset = float(rng.uniform(0.0, 0.5)) * float(np.abs(half @ normal))
        cuts.append(lambda p, n=normal, o=offset: o - p @ n)
    for _ in range(int(rng.integers(0, 4))):  # holes through the wall
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        axis = Rotation.align_vectors([direction], [[0, 0, 1]])[0].as_matrix()
        cuts.append(placed(cylinder(float(rng.uniform(0.08, 0.25)), 1.5), np.zeros(3), axis.T))
    return difference(shell, *cuts) if cuts else shell


def superquadrics(rng: np.random.Generator) -> Field:
    shape = None
    for _ in range(int(rng.integers(1, 4))):
        half = np.maximum(rng.uniform(0.15, 0.6, size=3), MIN_THICKNESS / 2)
        part = placed(superquadric(half, float(rng.uniform(0.1, 2.5)), float(rng.uniform(0.1, 2.5))),
                      _anchor(rng, shape, 0.6), _rotation(rng))
        shape = part if shape is None else union(shape, part)
    return shape


BUILDERS: dict[str, Callable[[np.random.Generator], Field]] = {
    "csg": csg, "tubes": tubes, "plates": plates, "blobs": blobs, "shells": shells, "superquadrics": superquadrics,
}


# ----------------------------------------------------------------------------------------------
# Meshing


def mesh_field(field: Field, detail: int) -> trimesh.Trimesh:
    """The largest closed piece of `field`'s inside, by marching cubes on a `detail`³ grid over the frame."""
    margin = 2 * (2 * DOMAIN) / detail
    axis = np.linspace(-DOMAIN - margin, DOMAIN + margin, detail)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    values = field(points).reshape(detail, detail, detail)
    # Parts reach at most the frame's edge; the outermost cells are forced outside so every piece closes.
    values[[0, -1], :, :] = values[:, [0, -1], :] = values[:, :, [0, -1]] = np.abs(values).max() + 1
    vertices, faces = mcubes.marching_cubes(-values, 0.0)  # PyMCubes meshes the positive side
    if len(faces) == 0:
        raise ShapekilnError("procedural shape came out empty")
    vertices = axis[0] + vertices * (axis[1] - axis[0])
    mesh = trimesh.Trimesh(vertices, faces[:, ::-1], process=True)  # outward normals
    pieces = mesh.split(only_watertight=False)
    if len(pieces) > 1:
        mesh = max(pieces, key=lambda piece: abs(piece.volume))
    if mesh.volume < 0:
        mesh.invert()
    return mesh


class ProceduralSource:
    """`count` procedural shapes, families in turn (see the module docstring), meshed at `detail`³."""

    name = "procedural"

    def __init__(self, count: int, seed: int = 0, detail: int = 64):
        if count < 0 or seed < 0:
            raise ShapekilnError(f"procedural source needs count >= 0 and seed >= 0, got count={count}, seed={seed}")
        if not 32 <= detail <= 256:
            raise ShapekilnError(f"procedural detail must be in [32, 256] (the meshing grid), got {detail}")
        self.count, self.seed, self.detail = int(count), int(seed), int(detail)

    def args(self) -> dict:
        return {"count": self.count, "seed": self.seed, "detail": self.detail}

    @classmethod
    def from_args(cls, args: dict) -> "ProceduralSource":
        return cls(args["count"], seed=args.get("seed", 0), detail=args.get("detail", 64))

    def items(self) -> Iterator[int]:
        return iter(range(self.count))

    def item_id(self, item: int) -> str:
        return f"proc-{item:06d}"

    def family(self, item: int) -> str:
        if not 0 <= item < self.count:
            raise ShapekilnError(f"procedural item {item} is out of range 0..{self.count - 1}")
        return FAMILIES[item % len(FAMILIES)]

    def field(self, item: int) -> Field:
        """Shape `item`'s implicit solid (negative inside), in the [-1, 1] frame it is built in."""
        return BUILDERS[self.family(item)](np.random.default_rng([self.seed, 7, item]))

    def load(self, item: int) -> ShapeRecord:
        family = self.family(item)
        mesh = mesh_field(self.field(item), self.detail)
        return ShapeRecord(id=self.item_id(item), mesh=mesh, captions=[CAPTIONS[family]],
                           category=family, attributes={"family": family}, source=self.name)


def min_voxels(resolution: int, extent: float = 0.8) -> float:
    """The thinnest part's width in voxels after prep at `resolution` (a shape spans at most the frame)."""
    return MIN_THICKNESS / (2 * DOMAIN) * (2 * extent) / (2 / resolution)

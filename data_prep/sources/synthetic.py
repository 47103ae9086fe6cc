"""The embedded default dataset: furniture and tableware composed from primitives, with known attributes.

It is both training data and ground truth for conditioning: every shape's category and discrete
attributes are known, each attribute changes the geometry visibly (after normalization, so through
proportions and parts, not absolute size), and the captions say exactly those attributes. Continuous
jitter stays small so that two shapes with the same attributes still read as the same description.

Shape `i` depends only on `(seed, i)`, so any slice of items can be built in any worker process.
Categories and attribute combinations are balanced rather than drawn i.i.d.: each block of
`len(CATEGORIES)` items holds every category once, and a category's k-th shape walks a seeded
permutation of its full attribute grid, so a modest prefix already covers every value.

Parts are closed, outward-oriented meshes that may overlap; the TSDF uses generalized winding numbers,
so no boolean union is needed. World +Y is up, objects stand on y = 0, the front faces +Z, sizes are
about one unit.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import trimesh
from trimesh.creation import box, cylinder, revolve, torus

from shapekiln.errors import ShapekilnError

from .base import ShapeRecord

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "blue": (45, 80, 200),
    "green": (50, 150, 60),
    "yellow": (235, 200, 40),
    "white": (235, 235, 230),
    "black": (30, 30, 30),
    "brown": (120, 75, 40),
    "gray": (128, 128, 128),
}

# How each attribute value reads in a caption. A single word goes before the noun ("a tall table"),
# a longer phrase after it ("a table with four legs").
# ATTRIBUTES is derived from this table, so what is sampled and what is said cannot drift apart.
_WORDS: dict[str, dict[str, dict[str, str]]] = {
    "table": {
        "height": {"tall": "tall", "short": "short"},
        "top": {"round": "round", "square": "square"},
        "legs": {"three": "with three legs", "four": "with four legs", "pedestal": "on a pedestal"},
    },
    "chair": {
        "back": {"high": "with a high back", "low": "with a low back"},
        "arms": {"yes": "with arms", "no": "without arms"},
        "legs": {"four": "with four legs", "pedestal": "on a pedestal"},
    },
    "stool": {
        "height": {"tall": "tall", "short": "short"},
        "seat": {"round": "round", "square": "square"},
        "legs": {"three": "with three legs", "four": "with four legs", "pedestal": "on a pedestal"},
    },
    "bench": {
        "length": {"long": "long", "short": "short"},
        "back": {"yes": "with a backrest", "no": "without a backrest"},
        "legs": {"four": "with four legs", "slab": "with slab legs"},
    },
    "shelf": {
        "width": {"wide": "wide", "narrow": "narrow"},
        "levels": {n: f"with {n} levels" for n in ("two", "three", "four", "five")},
        "back": {"yes": "with a back panel", "no": "with an open back"},
    },
    "lamp": {
        "height": {"tall": "tall", "short": "short"},
        "shade": {"cone": "with a cone shade", "cylinder": "with a cylindrical shade"},
        "base": {"round": "with a round base", "square": "with a square base"},
    },
    "vase": {
        "height": {"tall": "tall", "short": "short"},
        "shape": {"slender": "slender", "bulbous": "bulbous"},
        "handles": {"yes": "with two handles", "no": "without handles"},
    },
    "mug": {
        "height": {"tall": "tall", "short": "short"},
        "handle": {"yes": "with a handle", "no": "without a handle"},
    },
    "sofa": {
        "seats": {"two": "two-seat", "three": "three-seat"},
        "arms": {"yes": "with arms", "no": "without arms"},
    },
    "bed": {
        "size": {"single": "single", "double": "double"},
        "headboard": {"yes": "with a headboard", "no": "without a headboard"},
        "footboard": {"yes": "with a footboard", "no": "without a footboard"},
    },
}

CATEGORIES: list[str] = list(_WORDS)
ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    category: {**{name: list(values) for name, values in words.items()}, "color": list(PALETTE)}
    for category, words in _WORDS.items()
}
_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5}

# trimesh builds round things around +Z; this maps +Z to +Y (x, y, z) -> (x, z, -y).
_Z_TO_Y = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])


# ---------------------------------------------------------------- parts (each closed, outward)


def _box(lo, hi) -> trimesh.Trimesh:
    return box(bounds=np.array([lo, hi], dtype=float))


def _rod(p0, p1, radius: float, sections: int = 12) -> trimesh.Trimesh:
    return cylinder(radius, segment=np.array([p0, p1], dtype=float), sections=sections)


def _post(radius: float, y0: float, y1: float, x: float = 0.0, z: float = 0.0, sections: int = 12):
    """A vertical cylinder from y0 to y1."""
    return _rod([x, y0, z], [x, y1, z], radius, sections)


def _lathe(profile, sections: int = 32) -> trimesh.Trimesh:
    """A solid of revolution about +Y from (radius, y) points that start and end on the axis.

    Going out along the bottom and back in along the top keeps the normals outward.
    """
    mesh = revolve(np.asarray(profile, dtype=float), sections=sections)
    return mesh.apply_transform(_Z_TO_Y)


def _ring(major: float, minor: float, y: float) -> trimesh.Trimesh:
    """A horizontal torus around +Y at height y (a stool's footrest)."""
    transform = _Z_TO_Y.copy()
    transform[1, 3] = y
    return torus(major, minor, major_sections=32, minor_sections=8, transform=transform)


def _tube(path: np.ndarray, radius: float, sections: int = 10) -> trimesh.Trimesh:
    """A capped tube along a path in the z = 0 plane (handles): (m, 3) points -> closed mesh.

    trimesh's own sweep needs shapely for the caps; a planar path makes the frame trivial.
    """
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    binormal = np.array([0.0, 0.0, 1.0])
    normal = np.cross(tangent, binormal)
    angle = np.linspace(0.0, 2 * np.pi, sections, endpoint=False)
    rings = path[:, None, :] + radius * (
        np.cos(angle)[None, :, None] * normal[:, None, :] + np.sin(angle)[None, :, None] * binormal
    )  # (m, sections, 3)
    m = len(path)
    vertices = np.concatenate([rings.reshape(-1, 3), path[[0, -1]]])
    i, k = np.meshgrid(np.arange(m - 1), np.arange(sections), indexing="ij")
    a = i * sections + k
    b = i * sections + (k + 1) % sections
    c, d = a + sections, b + sections
    side = np.concatenate([np.stack([a, d, b], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    k, last = np.arange(sections), (m - 1) * sections
    cap0 = np.stack([np.full(sections, m * sections), k, (k + 1) % sections], -1)
    cap1 = np.stack([np.full(sections, m * sections + 1), last + (k + 1) % sections, last + k], -1)
    return trimesh.Trimesh(vertices, np.concatenate([side, cap0, cap1]), process=False)


def _handle(top, bottom, reach: float, radius: float) -> trimesh.Trimesh:
    """A C-shaped handle in the XY plane from `top` to `bottom` (x, y), bulging `reach` toward +X.

    The ends sit a little inside the body wall so the handle visibly attaches; a whole torus
    would have to cross the wall and poke into a mug's cavity.
    """
    s = np.linspace(0.0, 1.0, 16)
    x = np.interp(s, [0, 1], [top[0], bottom[0]]) + reach * np.sin(np.pi * s) ** 0.7
    y = np.interp(s, [0, 1], [top[1], bottom[1]])
    return _tube(np.stack([x, y, np.zeros_like(s)], -1), radius)


def _mirror_x(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The same part on the -X side: a half turn about +Y (a rotation, so normals stay outward)."""
    return mesh.copy().apply_transform(np.diag([-1.0, 1.0, -1.0, 1.0]))


def _legs_under(count: int, radius_at_top: float, y_top: float, leg_radius: float, splay: float = 0.0):
    """`count` legs evenly around the axis, each from (radius_at_top, y_top) down to the floor.

    Four legs start at 45° so they sit under a square's corners as well as a circle's.
    """
    legs = []
    for k in range(count):
        phi = 2 * np.pi * k / count + (np.pi / 4 if count == 4 else np.pi / 2)
        direction = np.array([np.cos(phi), 0.0, np.sin(phi)])
        top = direction * radius_at_top + [0, y_top, 0]
        foot = direction * (radius_at_top + splay)
        legs.append(("leg", _rod(foot, top, leg_radius)))
    return legs


def _pedestal(column_radius: float, base_radius: float, y_top: float, thin: float) -> list[tuple[str, trimesh.Trimesh]]:
    return [("base", _post(base_radius, 0.0, max(0.035, thin), sections=32)), ("column", _post(column_radius, 0.0, y_top, sections=16))]


# ---------------------------------------------------------------- one builder per category
#
# A builder returns named parts; the names in THIN_PARTS are the thin ones a coarse grid loses first
# (the structure metric checks each of them). `thin` is the smallest width (world units) any part may
# have: 0 gives the nominal proportions; `SyntheticSource(resolution=R)` sets it to PART_VOXELS voxels of
# R³ after normalization, so legs, poles and boards cannot fall between voxel centers.

THIN_PARTS = frozenset({"leg", "column", "spoke", "pole", "handle", "arm", "footrest", "post"})

Part = tuple[str, trimesh.Trimesh]


def _table(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    width = rng.uniform(0.9, 1.1)
    thick = max(rng.uniform(0.04, 0.06), thin)
    leg_r = max(rng.uniform(0.025, 0.035), thin / 2)
    height = rng.uniform(0.72, 0.82) if a["height"] == "tall" else rng.uniform(0.36, 0.44)
    half = width / 2
    if a["top"] == "round":
        parts = [("top", _post(half, height - thick, height, sections=48))]
        leg_at = 0.72 * half
    else:
        parts = [("top", _box([-half, height - thick, -half], [half, height, half]))]
        leg_at = 0.85 * half * np.sqrt(2) if a["legs"] == "four" else 0.72 * half
    if a["legs"] == "pedestal":
        return parts + _pedestal(max(rng.uniform(0.05, 0.07), thin / 2), 0.35 * width, height - thick, thin)
    return parts + _legs_under(_COUNT_WORDS[a["legs"]], leg_at, height - thick, leg_r)


def _chair(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    w, d = rng.uniform(0.45, 0.52), rng.uniform(0.44, 0.5)
    seat_y, thick = rng.uniform(0.43, 0.48), max(0.05, thin)
    back_h = rng.uniform(0.5, 0.6) if a["back"] == "high" else rng.uniform(0.2, 0.26)
    back = max(0.05, thin)
    parts = [
        ("seat", _box([-w / 2, seat_y - thick, -d / 2], [w / 2, seat_y, d / 2])),
        ("back", _box([-w / 2, seat_y - thick, -d / 2], [w / 2, seat_y + back_h, -d / 2 + back])),
    ]
    if a["arms"] == "yes":
        arm_y, rest, support = seat_y + 0.2, max(0.06, thin) / 2, max(0.04, thin) / 2
        for x in (-w / 2 - 0.03, w / 2 + 0.03):
            parts.append(("arm", _box([x - rest, arm_y - max(0.03, thin), -d / 2], [x + rest, arm_y, d / 2])))
            parts.append(("arm", _box([x - support, seat_y - thick, d / 2 - 0.04 - support], [x + support, arm_y, d / 2 - 0.04 + support])))
    if a["legs"] == "pedestal":
        # An office chair: a column on a five-spoke star base reads clearly as "pedestal".
        spoke = max(0.02, thin / 2)
        hub = max(0.04, 2 * spoke)
        parts.append(("column", _post(max(0.035, thin / 2), hub, seat_y - thick, sections=16)))
        for k in range(5):
            phi = 2 * np.pi * k / 5
            tip = [0.3 * np.cos(phi), max(0.025, spoke), 0.3 * np.sin(phi)]
            parts.append(("spoke", _rod([0, hub, 0], tip, spoke, sections=8)))
        return parts
    half_leg = max(0.04, thin) / 2
    inset = 0.015 + half_leg
    for x in (-w / 2 + inset, w / 2 - inset):
        for z in (-d / 2 + inset, d / 2 - inset):
            parts.append(("leg", _box([x - half_leg, 0.0, z - half_leg], [x + half_leg, seat_y - thick, z + half_leg])))
    return parts


def _stool(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    size = rng.uniform(0.34, 0.4)
    thick = max(rng.uniform(0.04, 0.06), thin)
    height = rng.uniform(0.72, 0.8) if a["height"] == "tall" else rng.uniform(0.4, 0.46)
    half = size / 2
    if a["seat"] == "round":
        parts = [("seat", _post(half, height - thick, height, sections=32))]
    else:
        parts = [("seat", _box([-half, height - thick, -half], [half, height, half]))]
    if a["legs"] == "pedestal":
        return parts + _pedestal(max(0.04, thin / 2), 0.8 * half, height - thick, thin)
    top_r, splay = 0.7 * half, 0.08 * height
    parts += _legs_under(_COUNT_WORDS[a["legs"]], top_r, height - thick, max(0.02, thin / 2), splay)
    if a["height"] == "tall":
        # A footrest ring at a third of the height, where the splayed legs are that far out.
        parts.append(("footrest", _ring(top_r + splay * 2 / 3, max(0.015, thin / 2), height / 3)))
    return parts


def _bench(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    length = rng.uniform(1.4, 1.6) if a["length"] == "long" else rng.uniform(0.85, 0.95)
    depth, seat_y, thick = rng.uniform(0.36, 0.42), rng.uniform(0.42, 0.46), max(0.06, thin)
    hx, hz = length / 2, depth / 2
    parts = [("seat", _box([-hx, seat_y - thick, -hz], [hx, seat_y, hz]))]
    if a["legs"] == "slab":
        slab = max(0.04, thin)
        for x in (-hx + 0.06, hx - 0.06 - slab):
            parts.append(("slab", _box([x, 0.0, -hz + 0.02], [x + slab, seat_y - thick, hz - 0.02])))
    else:
        half_leg = max(0.05, thin) / 2
        for x in (-hx + 0.05, hx - 0.05):
            for z in (-hz + 0.05, hz - 0.05):
                parts.append(("leg", _box([x - half_leg, 0.0, z - half_leg], [x + half_leg, seat_y - thick, z + half_leg])))
    if a["back"] == "yes":
        top, board = seat_y + rng.uniform(0.35, 0.42), max(0.04, thin)
        half_post = max(0.05, thin) / 2
        for x in (-hx + 0.05, hx - 0.05):
            parts.append(("post", _box([x - half_post, seat_y - thick, -hz], [x + half_post, top, -hz + board])))
        parts.append(("back", _box([-hx, top - 0.18, -hz], [hx, top, -hz + board])))
    return parts


def _shelf(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    levels = _COUNT_WORDS[a["levels"]]
    width = rng.uniform(1.0, 1.15) if a["width"] == "wide" else rng.uniform(0.5, 0.6)
    depth, level_h, board = rng.uniform(0.28, 0.34), rng.uniform(0.3, 0.34), max(0.03, thin)
    hx, hz = width / 2, depth / 2
    height = levels * level_h + board
    parts = [("side", _box([x, 0.0, -hz], [x + board, height, hz])) for x in (-hx, hx - board)]
    for k in range(levels + 1):
        y = k * level_h
        parts.append(("board", _box([-hx, y, -hz], [hx, y + board, hz])))
    if a["back"] == "yes":
        parts.append(("back", _box([-hx, 0.0, -hz], [hx, height, -hz + max(0.015, thin)])))
    return parts


def _lamp(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    tall = a["height"] == "tall"
    height = rng.uniform(1.4, 1.6) if tall else rng.uniform(0.48, 0.56)
    shade_h = rng.uniform(0.3, 0.36) if tall else rng.uniform(0.2, 0.24)
    shade_r = rng.uniform(0.2, 0.24) if tall else rng.uniform(0.15, 0.18)
    base = rng.uniform(0.16, 0.2) if tall else rng.uniform(0.11, 0.13)
    base_h = max(0.04, thin)
    top_r = 0.4 * shade_r if a["shade"] == "cone" else shade_r
    y0 = height - shade_h
    parts = [
        ("shade", _lathe([[0, y0], [shade_r, y0], [top_r, height], [0, height]], sections=32)),
        ("pole", _post(max(0.03 if tall else 0.015, thin / 2), 0.0, y0 + 0.3 * shade_h)),
    ]
    if a["base"] == "round":
        parts.append(("base", _post(base, 0.0, base_h, sections=32)))
    else:
        parts.append(("base", _box([-base, 0.0, -base], [base, base_h, base])))
    return parts


def _vase(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    radius = rng.uniform(0.22, 0.26)
    height = rng.uniform(0.75, 0.85) if a["height"] == "tall" else rng.uniform(0.38, 0.44)
    if a["shape"] == "bulbous":
        knots_t, knots_r = [0, 0.1, 0.35, 0.6, 0.8, 0.92, 1.0], [0.55, 0.85, 1.0, 0.8, 0.42, 0.4, 0.5]
    else:
        knots_t, knots_r = [0, 0.5, 0.85, 1.0], [0.42, 0.38, 0.36, 0.45]
    t = np.linspace(0.0, 1.0, 17)
    r = radius * np.interp(t, knots_t, knots_r) * rng.uniform(0.95, 1.05)
    wall, mouth_depth = max(0.025, thin), 0.15 * height
    outer = np.stack([r, t * height], -1)
    profile = np.concatenate(
        [
            [[0.0, 0.0]],
            outer,
            [[r[-1] - wall, height], [r[-1] - wall, height - mouth_depth], [0.0, height - mouth_depth]],
        ]
    )
    parts = [("body", _lathe(profile, sections=32))]
    if a["handles"] == "yes":
        t_top, t_bot = 0.85, 0.55
        top = (np.interp(t_top, t, r) - 0.025, t_top * height)
        bottom = (np.interp(t_bot, t, r) - 0.025, t_bot * height)
        handle = _handle(top, bottom, reach=0.04 + 0.08 * height, radius=max(0.018, thin / 2))
        parts += [("handle", handle), ("handle", _mirror_x(handle))]
    return parts


def _mug(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    radius = rng.uniform(0.23, 0.26)
    height = rng.uniform(0.6, 0.66) if a["height"] == "tall" else rng.uniform(0.3, 0.34)
    wall, floor = max(0.025, thin), max(0.03, thin)
    inner = radius - wall
    parts = [("body", _lathe([[0, 0], [radius, 0], [radius, height], [inner, height], [inner, floor], [0, floor]]))]
    if a["handle"] == "yes":
        top, bottom = (radius - wall / 2, 0.82 * height), (radius - wall / 2, 0.22 * height)
        parts.append(("handle", _handle(top, bottom, reach=0.1 + 0.15 * height, radius=max(0.025, thin / 2))))
    return parts


def _sofa(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    seats = _COUNT_WORDS[a["seats"]]
    seat_w = rng.uniform(0.6, 0.68)
    depth, base_y, seat_y = rng.uniform(0.8, 0.9), 0.08, rng.uniform(0.4, 0.44)
    back_top = seat_y + rng.uniform(0.4, 0.46)
    hx, hz = seats * seat_w / 2, depth / 2
    arm = 0.18 if a["arms"] == "yes" else 0.0
    parts = [
        ("base", _box([-hx - arm, base_y, -hz], [hx + arm, seat_y - 0.1, hz])),
        ("back", _box([-hx - arm, base_y, -hz], [hx + arm, back_top, -hz + 0.2])),
    ]
    # One cushion per seat with a gap between them, so the seat count shows beyond the width.
    for k in range(seats):
        x0 = -hx + k * seat_w
        parts.append(("cushion", _box([x0 + 0.015, seat_y - 0.1, -hz + 0.2], [x0 + seat_w - 0.015, seat_y, hz])))
    if arm:
        for x in (-hx - arm, hx):
            parts.append(("armrest", _box([x, base_y, -hz], [x + arm, seat_y + 0.2, hz])))
    # Feet: too short to break off, so not among THIN_PARTS.
    for x in (-hx - arm + 0.06, hx + arm - 0.06):
        for z in (-hz + 0.06, hz - 0.06):
            parts.append(("foot", _post(max(0.03, thin / 2), 0.0, base_y + 0.01, x, z, sections=12)))
    return parts


def _bed(a: dict, rng: np.random.Generator, thin: float) -> list[Part]:
    width = rng.uniform(0.9, 1.0) if a["size"] == "single" else rng.uniform(1.5, 1.65)
    length = rng.uniform(1.95, 2.1)
    frame_y, top_y = 0.3, rng.uniform(0.48, 0.52)
    hx, hz = width / 2, length / 2
    parts = [
        ("frame", _box([-hx, 0.1, -hz], [hx, frame_y, hz])),
        ("mattress", _box([-hx + 0.03, frame_y, -hz + 0.03], [hx - 0.03, top_y, hz - 0.03])),
    ]
    pillows = 1 if a["size"] == "single" else 2
    pillow_w = (width - 0.2) / pillows
    for k in range(pillows):
        x0 = -hx + 0.1 + k * pillow_w
        lo, hi = [x0 + 0.03, top_y - 0.02, -hz + 0.08], [x0 + pillow_w - 0.03, top_y + 0.1, -hz + 0.4]
        parts.append(("pillow", _box(lo, hi)))
    for x in (-hx + 0.05, hx - 0.05):
        for z in (-hz + 0.05, hz - 0.05):
            parts.append(("foot", _box([x - 0.04, 0.0, z - 0.04], [x + 0.04, 0.12, z + 0.04])))
    board = max(0.06, thin)
    if a["headboard"] == "yes":
        parts.append(("headboard", _box([-hx, 0.0, -hz - board], [hx, rng.uniform(0.95, 1.05), -hz])))
    if a["footboard"] == "yes":
        parts.append(("footboard", _box([-hx, 0.0, hz], [hx, rng.uniform(0.6, 0.65), hz + board])))
    return parts


_BUILDERS: dict[str, Callable[[dict, np.random.Generator, float], list[Part]]] = {
    "table": _table,
    "chair": _chair,
    "stool": _stool,
    "bench": _bench,
    "shelf": _shelf,
    "lamp": _lamp,
    "vase": _vase,
    "mug": _mug,
    "sofa": _sofa,
    "bed": _bed,
}
assert list(_BUILDERS) == CATEGORIES


# ---------------------------------------------------------------- captions


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions_for(category: str, attributes: dict[str, str]) -> list[str]:
    """Four captions, all true: three name every attribute, the last only color and category."""
    phrases = [_WORDS[category][name][attributes[name]] for name in _WORDS[category]]
    before = [p for p in phrases if " " not in p]
    after = [p for p in phrases if " " in p]
    # "with a high back, arms and four legs" rather than "with a high back, with arms and with ..."
    withs = [p.removeprefix("with ") for p in after if p.startswith("with ")]
    others = [p for p in after if not p.startswith("with ")]
    post = ", ".join((["with " + _and(withs)] if withs else []) + others)
    color = attributes["color"]
    noun = " ".join(before + [category])
    return [
        f"{_a(' '.join(before + [color, category]))} {post}",
        f"{_a(noun)} in {color} {post}",
        f"{_a(noun)} {post}, colored {color}",
        f"{_a(color)} {category}",
    ]


# ---------------------------------------------------------------- public


def build_parts(category: str, attributes: dict[str, str], rng: np.random.Generator, min_width: float = 0.0) -> list[Part]:
    """The named parts of one shape with the given attributes (all of ATTRIBUTES[category]).

    `rng` draws the jitter. `min_width`: the smallest width of any part, as a fraction of the
    shape's longest side (0: the nominal proportions); the shape is built again with thicker parts
    from the same jitter until they meet it.
    """
    if category not in ATTRIBUTES:
        raise ShapekilnError(f"unknown synthetic category {category!r}; choose from {', '.join(CATEGORIES)}")
    for name, allowed in ATTRIBUTES[category].items():
        if attributes.get(name) not in allowed:
            raise ShapekilnError(
                f"synthetic {category}: attribute {name!r} must be one of {allowed}, "
                f"got {attributes.get(name)!r}"
            )
    if not 0 <= min_width < 0.2:
        raise ShapekilnError(f"min_width must be in [0, 0.2) of the longest side, got {min_width}")
    state = rng.bit_generator.state
    parts = _BUILDERS[category](attributes, rng, 0.0)
    thin = 0.0
    for _ in range(4):  # thicker parts may lengthen the longest side a little: converge on it
        wanted = min_width * _longest_side(parts)
        if wanted <= thin:
            break
        thin = wanted * 1.01
        rng.bit_generator.state = state
        parts = _BUILDERS[category](attributes, rng, thin)
    return parts


def build_mesh(category: str, attributes: dict[str, str], rng: np.random.Generator, min_width: float = 0.0) -> trimesh.Trimesh:
    """One shape with the given attributes as one mesh of (overlapping) closed parts; see build_parts."""
    parts = [mesh for _, mesh in build_parts(category, attributes, rng, min_width)]
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    vertices = np.concatenate([p.vertices for p in parts])
    faces = np.concatenate([p.faces + offset for p, offset in zip(parts, offsets)])
    colors = np.tile(np.array([*PALETTE[attributes["color"]], 255], dtype=np.uint8), (len(vertices), 1))
    return trimesh.Trimesh(vertices, faces, vertex_colors=colors, process=False)


def _longest_side(parts: list[Part]) -> float:
    vertices = np.concatenate([mesh.vertices for _, mesh in parts])
    return float((vertices.max(axis=0) - vertices.min(axis=0)).max())


# Below this a grid cannot hold the thin parts at PART_VOXELS and still show what they are (a 16³ lamp's
# pole is then already 0.19 of its longest side).
MIN_THIN_RESOLUTION = 16

# The thinnest part's width, in voxels of the grid a shape is built for. 1.5 keeps every part in the
# prepared TSDF, but the 3×8³ VQ-VAE (general-32) then drops long thin rods: at 32³ it reconstructed
# 24 of 100 lamps and 37 of 100 tables in one piece (poles 61 of 100, legs 127 of 268 kept); the same
# model on shapes built at 2.5 kept 30 of 30 lamps and 27 of 30 tables whole (legs 78 of 80).
PART_VOXELS = 2.5


class SyntheticSource:
    """`count` procedural shapes; shape i is a pure function of (seed, i) and the grid it is built for.

    `resolution`: the grid the shapes will be prepared at; then every part is at least
    `part_voxels` voxels wide there (after normalization to `extent`), so thin legs, poles and
    handles stay whole. None keeps the nominal proportions, whatever the grid.
    """

    name = "synthetic"

    def __init__(self, count: int, seed: int = 0, resolution: int | None = None, part_voxels: float = PART_VOXELS,
                 extent: float = 0.8):
        if count < 0 or seed < 0:
            raise ShapekilnError(
                f"synthetic source needs count >= 0 and seed >= 0, got count={count}, seed={seed}"
            )
        if resolution is not None and resolution < MIN_THIN_RESOLUTION:
            raise ShapekilnError(
                f"synthetic shapes keep their thin parts (legs, poles, handles) only at resolution >= "
                f"{MIN_THIN_RESOLUTION}, got {resolution}"
            )
        if not 0 <= part_voxels <= 4 or not 0 < extent <= 1:
            raise ShapekilnError(f"part_voxels must be in [0, 4] and extent in (0, 1], got {part_voxels}, {extent}")
        self.count = int(count)
        self.seed = int(seed)
        self.resolution = resolution
        self.part_voxels = float(part_voxels)
        # A width w of the longest side L spans w / L · 2·extent of [-1, 1], i.e. w / L · extent · R voxels.
        self.min_width = 0.0 if resolution is None else self.part_voxels / (extent * resolution)

    @classmethod
    def for_config(cls, count: int, config, seed: int = 0, part_voxels: float = PART_VOXELS) -> "SyntheticSource":
        """`count` shapes built for a PrepConfig's grid (its resolution and extent); part_voxels 0 keeps the
        nominal proportions."""
        resolution = config.resolution if part_voxels > 0 else None
        return cls(count, seed=seed, resolution=resolution, part_voxels=part_voxels, extent=config.extent)

    def args(self) -> dict:
        """What defines this source (recorded in dataset.json; `from_args` rebuilds it)."""
        return {"count": self.count, "seed": self.seed, "resolution": self.resolution, "part_voxels": self.part_voxels}

    @classmethod
    def from_args(cls, args: dict, extent: float = 0.8) -> "SyntheticSource":
        return cls(args["count"], seed=args.get("seed", 0), resolution=args.get("resolution"),
                   part_voxels=args.get("part_voxels", 1.5), extent=extent)

    def items(self) -> Iterator[int]:
        return iter(range(self.count))

    def item_id(self, item: int) -> str:
        return f"syn-{item:06d}"

    def describe(self, item: int) -> tuple[str, dict[str, str]]:
        """Category and attributes of shape `item`, without building it (cheap: for evaluation)."""
        if not 0 <= item < self.count:
            raise ShapekilnError(f"synthetic item {item} is out of range 0..{self.count - 1}")
        n = len(CATEGORIES)
        block, slot = divmod(item, n)
        category_index = int(np.random.default_rng([self.seed, 0, block]).permutation(n)[slot])
        category = CATEGORIES[category_index]
        # Every block holds each category once, so `block` is this shape's rank within its category.
        grid = ATTRIBUTES[category]
        size = int(np.prod([len(values) for values in grid.values()]))
        cycle, rank = divmod(block, size)
        combo = int(np.random.default_rng([self.seed, 1, category_index, cycle]).permutation(size)[rank])
        attributes = {}
        for name, values in grid.items():
            combo, index = divmod(combo, len(values))
            attributes[name] = values[index]
        return category, attributes

    def parts(self, item: int) -> list[Part]:
        """Shape `item`'s named parts, before normalization (the structure metric's part list)."""
        category, attributes = self.describe(item)
        return build_parts(category, attributes, np.random.default_rng([self.seed, 2, item]), self.min_width)

    def thin_part_masks(self, item: int, resolution: int, extent: float = 0.8) -> list[np.ndarray]:
        """The voxels (R, R, R) bool of each of shape `item`'s THIN_PARTS, placed as prep places the shape
        (normalized to `extent`): what the structure metric checks for in its TSDF, reconstruction or sample."""
        from shapekiln.data_prep.process import normalize
        from shapekiln.metrics import part_voxels

        _, transform = normalize(self.load(item).mesh, extent)
        return [part_voxels(part.copy().apply_transform(transform), resolution)
                for name, part in self.parts(item) if name in THIN_PARTS]

    def load(self, item: int) -> ShapeRecord:
        category, attributes = self.describe(item)
        mesh = build_mesh(category, attributes, np.random.default_rng([self.seed, 2, item]), self.min_width)
        return ShapeRecord(
            id=self.item_id(item),
            mesh=mesh,
            captions=captions_for(category, attributes),
            category=category,
            attributes=attributes,
            source=self.name,
        )

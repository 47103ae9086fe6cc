"""ObjaverseSource against a cache in the objaverse package's layout, built from real uids and
records (../shared/data/objaverse) with trimesh-written GLBs, and with the network cut off."""

import csv
import gzip
import json
import pickle
import urllib.request

import numpy as np
import pytest
import trimesh

objaverse = pytest.importorskip("objaverse", reason='the objaverse extra is not installed (pip install -e ".[objaverse]")')

from shapekiln.data_prep.sources.objaverse import ObjaverseSource  # noqa: E402
from shapekiln.errors import ShapekilnError  # noqa: E402

STAIRS = "8476c4170df24cf5bbe6967222d1a42d"  # full record: tags, HTML in its description
BEAR = "da9b588f7a7346519f391c3eb9532226"  # LVIS "grizzly"; its Cap3D caption is in the record
STONE_BEAR = "33e532df00c54a13beda1cea02cef604"  # no LVIS category, no Cap3D caption
CHAIRS = ["3df6e89550b747a79458f197889607ce", "82822706425d40f89d4bbdc63a8ec821",
          "ad0b974411d94ec2bd2bd62b701018bc"]
MUGS = ["0166cd3012284d0cb89d0c6548f9680c", "93ad19db34bc49a0b7acc24e7a5a22fd"]
NOT_CACHED = CHAIRS[1]  # in object paths, but its GLB was never downloaded

# Metadata files as the package names them; the real assignment of uids to files is unknown here.
METADATA_DIR = {STAIRS: "000-000", STONE_BEAR: "000-000", BEAR: "000-001",
                **{uid: "000-002" for uid in CHAIRS + MUGS}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any download attempt fails the test; the package's global path is restored afterwards."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(objaverse, "_VERSIONED_PATH", objaverse._VERSIONED_PATH)


def _gzip_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as file:
        json.dump(data, file)


@pytest.fixture
def real(shared_data):
    folder = shared_data / "objaverse"
    records = json.loads((folder / "annotations_sample_full_record.json").read_text())
    records.update(json.loads((folder / "annotations_sample_partial_records.json").read_text()))
    return {
        "records": records,
        "lvis": json.loads((folder / "lvis-annotations.json").read_text()),
        "cap3d": json.loads((folder / "cap3d_captions_subset.json").read_text()),
    }


@pytest.fixture
def cache(tmp_path, real):
    root = tmp_path / "hf-objaverse-v1"
    object_paths = {uid: f"glbs/{d}/{uid}.glb" for uid, d in METADATA_DIR.items()}
    _gzip_json(root / "object-paths.json.gz", object_paths)
    _gzip_json(root / "lvis-annotations.json.gz", real["lvis"])
    for metadata_dir in ("000-000", "000-001"):
        records = real["records"].items()
        _gzip_json(
            root / "metadata" / f"{metadata_dir}.json.gz",
            {uid: record for uid, record in records if METADATA_DIR[uid] == metadata_dir},
        )
    # No metadata/000-002.json.gz: the chairs and mugs are captioned by Cap3D only.
    for uid, object_path in object_paths.items():
        if uid != NOT_CACHED:
            mesh = trimesh.creation.icosphere(subdivisions=1)
            mesh.visual.vertex_colors = np.tile([10, 120, 250, 255], (len(mesh.vertices), 1))
            (root / object_path).parent.mkdir(parents=True, exist_ok=True)
            mesh.export(root / object_path)
    (root / "glbs" / "000-002" / f"{MUGS[0]}.glb.tmp").write_bytes(b"partial download")
    return root


@pytest.fixture
def cap3d_csv(tmp_path, real):
    """Cap3D's layout: no header row, `uid,caption`, quoted where a caption has a comma."""
    path = tmp_path / "Cap3D_automated_Objaverse.csv"
    captions = {uid: real["cap3d"][uid] for uid in CHAIRS + MUGS}
    captions[BEAR] = real["records"][BEAR]["_cap3d_top_caption"]
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows(sorted(captions.items()))
    return path


def _records(source):
    return {item.uid: source.load(item) for item in source.items()}


def _only_record(source):
    (item,) = source.items()
    return source.load(item)


def test_lvis_categories_select_cached_uids(cache, cap3d_csv):
    source = ObjaverseSource(cache, lvis_categories=["chair", "mug"], captions_csv=cap3d_csv)
    cached_chairs = [uid for uid in CHAIRS if uid != NOT_CACHED]
    assert [source.item_id(item) for item in source.items()] == sorted(cached_chairs + MUGS)
    assert source.missing == [NOT_CACHED]
    records = _records(source)
    for uid in cached_chairs:
        assert records[uid].category == "chair"
        assert records[uid].attributes == {"license": None, "tags": [], "lvis_category": "chair"}
    assert records[MUGS[1]].captions == ["White coffee mug"]
    assert records[MUGS[1]].source == "objaverse"
    assert records[MUGS[1]].mesh.visual.kind == "vertex"


def test_limit_keeps_the_first_uids(cache, cap3d_csv):
    source = ObjaverseSource(
        cache, lvis_categories=["chair", "mug"], captions_csv=cap3d_csv, limit=2
    )
    assert [item.uid for item in source.items()] == sorted([CHAIRS[0], CHAIRS[2]] + MUGS)[:2]


def test_captions_from_cap3d_else_annotations(cache, cap3d_csv):
    source = ObjaverseSource(cache, uids=[STAIRS, BEAR, STONE_BEAR], captions_csv=cap3d_csv)
    records = _records(source)

    bear = records[BEAR]
    assert bear.captions == ["a black bear"]
    assert bear.category == "grizzly"
    assert bear.attributes == {"license": "by", "tags": [], "lvis_category": "grizzly"}

    stone_bear = records[STONE_BEAR]
    assert stone_bear.captions == [
        "Another Grizzly Bear Turned Into Stone", "There is another bear turned into stone."
    ]
    assert stone_bear.category == "unknown"

    stairs = records[STAIRS]
    assert stairs.captions[:2] == [
        "Iain Dawson Kew Road Formby", "Iain Dawson Kew Road Formby, stair, staircase, staircon"
    ]
    # The description is "http://staircon.com/ <br>Export by <b>Alan Grice ...": no link, no tags.
    assert stairs.captions[2].startswith("Export by Alan Grice Staircase")
    assert stairs.attributes["tags"] == ["stair", "staircase", "staircon"]
    json.dumps([record.attributes for record in records.values()])


def test_every_cached_uid_without_a_captions_csv(cache):
    (cache / "glbs" / "000-002").rename(cache / "elsewhere")  # those uids need 000-002 metadata
    source = ObjaverseSource(cache)
    assert [item.uid for item in source.items()] == sorted([STAIRS, BEAR, STONE_BEAR])
    assert source.missing == []
    # "Scientific name: Ursidae\nSpeed: ...": a line break ends the first sentence.
    assert _records(source)[BEAR].captions == ["Bear", "Scientific name: Ursidae"]


def test_a_metadata_file_is_read_once_per_process(cache, monkeypatch):
    calls = []
    load_annotations = objaverse.load_annotations

    def counted(uids=None):
        calls.append(sorted(uids))
        return load_annotations(uids)

    monkeypatch.setattr(objaverse, "load_annotations", counted)
    source = ObjaverseSource(cache, uids=[STAIRS, STONE_BEAR, BEAR])
    _records(source)
    _records(source)
    assert calls == [sorted([STAIRS, STONE_BEAR]), [BEAR]]


def test_worker_process_finds_the_cache(cache, cap3d_csv):
    source = ObjaverseSource(cache, uids=[STONE_BEAR], captions_csv=cap3d_csv)
    # A spawned worker imports objaverse afresh, with the default cache path.
    objaverse._VERSIONED_PATH = "/nonexistent/hf-objaverse-v1"
    record = _only_record(pickle.loads(pickle.dumps(source)))
    assert record.captions[0] == "Another Grizzly Bear Turned Into Stone"


def test_cap3d_csv_with_a_header_row(cache, tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text(f'uid,caption\n{BEAR},"a brown bear, standing"\n')
    record = _only_record(ObjaverseSource(cache, uids=[BEAR], captions_csv=path))
    assert record.captions == ["a brown bear, standing"]


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(ShapekilnError, match=r"Objaverse cache not found: .*no-cache"):
        ObjaverseSource(tmp_path / "no-cache")


def test_missing_index_files_are_named_not_downloaded(cache, cap3d_csv):
    (cache / "lvis-annotations.json.gz").unlink()
    with pytest.raises(ShapekilnError, match=r"has no lvis-annotations\.json\.gz"):
        ObjaverseSource(cache, lvis_categories=["chair"])
    # Without categories to select by, LVIS is optional: the bear just has no LVIS category.
    record = _only_record(ObjaverseSource(cache, uids=[BEAR]))
    assert record.category == "unknown" and record.attributes["lvis_category"] is None

    with pytest.raises(ShapekilnError, match=r"has no metadata/000-002\.json\.gz"):
        ObjaverseSource(cache, uids=MUGS)  # no captions CSV: their annotations are needed

    (cache / "object-paths.json.gz").unlink()
    with pytest.raises(ShapekilnError, match=r"has no object-paths\.json\.gz"):
        ObjaverseSource(cache)


def test_unknown_lvis_category(cache):
    with pytest.raises(ShapekilnError, match="unknown LVIS categories: chiar"):
        ObjaverseSource(cache, lvis_categories=["chair", "chiar"])

"""Dataset sources by name: each yields ShapeRecords (id, mesh, captions, category, attributes)."""

from shapekiln.data_prep.sources.base import ShapeRecord, Source
from shapekiln.data_prep.sources.folder import FolderSource
from shapekiln.data_prep.sources.objaverse import ObjaverseSource
from shapekiln.data_prep.sources.synthetic import SyntheticSource

SOURCES: dict[str, type] = {
    "synthetic": SyntheticSource,
    "folder": FolderSource,
    "objaverse": ObjaverseSource,
}

__all__ = ["SOURCES", "FolderSource", "ObjaverseSource", "ShapeRecord", "Source", "SyntheticSource"]

"""shapekiln.models (see DESIGN.md)."""

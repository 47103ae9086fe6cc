"""shapekiln.sample (see DESIGN.md)."""

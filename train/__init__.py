"""shapekiln.train (see DESIGN.md)."""

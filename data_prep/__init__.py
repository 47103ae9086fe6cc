"""Raw meshes → normalized TSDF grids, rendered views, captions and webdataset shards."""

"""On-disk formats (raw layout, Chinese-CLIP TSV, reports) and the demo data generator.

Each format has exactly one reader/writer module here; the rest of mmcn calls it.
"""

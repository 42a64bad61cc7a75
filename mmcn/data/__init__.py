"""On-disk formats and the data they hold: the raw layout, Chinese-CLIP TSV + lineidx, the
ingest manifest and report, region-feature shards and the Oscar export, Chinese tags, the
LMDB store (format + reader in ``lmdb_store``, builder in ``lmdb_build``) and its torch
Datasets, evaluation files; and the demo data generator.

The rest of mmcn reads and writes these files through the modules here, never by hand;
a format's reader and writer live in one module (the LMDB store's builder apart from its
reader, so that training and evaluation do not depend on the build code).
"""

"""mmcn: a reproducible DVC pipeline for Chinese vision-language models.

``mmcn.Captioner`` and ``mmcn.Searcher`` (from :mod:`mmcn.infer`) caption and search raw
images with trained models; they are imported on first use, so ``import mmcn`` stays light.
"""
__version__ = "0.1.0"

_LAZY = {"Captioner": "mmcn.infer", "Searcher": "mmcn.infer", "ChainConfig": "mmcn.infer",
         "Decoding": "mmcn.models.regions.inference"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmcn' has no attribute {name!r}")

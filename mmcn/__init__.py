"""mmcn: a reproducible DVC pipeline for Chinese vision-language models."""
__version__ = "0.1.0"

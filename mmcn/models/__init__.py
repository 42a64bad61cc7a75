"""Models (tensors in, tensors out), one package per family: ``regions`` (Oscar-style, on
region features) and ``pixels`` (Chinese-CLIP, ClipCap); the tasks, their families and model
building/loading in :mod:`mmcn.models.factory`; tokenizers and the runtime (device, threads)
shared."""

"""The install pins the CUDA build of torch that torchvision's PyPI wheel needs; its ops run on CPU."""
import torch
import torchvision
from torchvision import ops


def test_torchvision_ops_run_on_cpu():
    assert torch.__version__.startswith("2.13.0") and "+cpu" not in torch.__version__
    assert torchvision.__version__.startswith("0.28.0")
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    pooled = ops.roi_align(torch.ones(1, 4, 16, 16), [boxes[:1]], output_size=(7, 7), spatial_scale=0.5)
    assert pooled.shape == (1, 4, 7, 7) and torch.allclose(pooled, torch.ones_like(pooled))

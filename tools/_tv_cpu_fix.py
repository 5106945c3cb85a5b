"""Import guard for PyPI's CUDA-built torchvision wheel beside a CPU-only torch.

torchvision's compiled ops fail to load on a CPU torch, and its meta registrations then raise
``RuntimeError: operator torchvision::nms does not exist`` on import, which breaks
``import streaming``, ``import torchmetrics`` and diffusers' AutoencoderKL. Just before
torchvision is first imported, this defines the two op schemas it registers fakes for.
It does nothing on a CUDA or ROCm torch. Installed by the Makefile as a one-line .pth file.
"""
import importlib.abc
import sys

_LIB = None


class _TorchvisionGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # one-shot
        try:
            import torch

            if torch.version.cuda is None and torch.version.hip is None:
                try:
                    torch.ops.torchvision.nms
                except (AttributeError, RuntimeError):
                    global _LIB
                    _LIB = torch.library.Library("torchvision", "DEF")
                    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except Exception:
            pass
        return None  # let the normal finders import torchvision


def install() -> None:
    if not any(isinstance(f, _TorchvisionGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionGuard())

"""Feature extractors for the metrics: uint8 images [N,3,H,W] -> {"pool", "spatial", "logits"}.

``InceptionV3FID`` is the TF-2015 Inception-v3 graph as ported to PyTorch by pytorch-fid / torch-fidelity
(same module names, so it loads their ``pt_inception-2015-12-05-6726825d.pth`` /
``weights-inception-2015-12-05-6726825d.pth`` file). Features, matching the ADM evaluator:
  pool     2048-d global average pool (``pool_3``)                  -> FID, precision/recall
  spatial  first 7 channels of Mixed_6d's 1x1 branch after ReLU (ADM's ``mixed_6/conv``), 17x17,
           flattened in (h, w, c) order like TF's NHWC: 7*17*17 = 2023-d -> sFID
  logits   1008-way logits without the fc bias (ADM's softmax graph, torch-fidelity's
           ``logits_unbiased``)                                       -> IS
Images are resized to 299x299 with TF1-style bilinear resampling (no half-pixel offset, no antialias),
then mapped to [-1, 1) by (x - 128) / 128, as in the TF graph.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: source coordinate = dst * in/out (no half-pixel shift)."""
    n, c, h, w = x.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return x

    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, dtype=torch.float64, device=x.device) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    y0, y1, fy = axis(h, oh)
    x0, x1, fx = axis(w, ow)
    top = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]                    # (N, C, oh, w)
    return top[..., x0] * (1 - fx) + top[..., x1] * fx                                    # (N, C, oh, ow)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU: every conv of the graph."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    """3x3/1 average pool that, like TF, ignores the zero padding."""
    # PyTorch counts the padded zeros by default (count_include_pad=True); the TF graph does not.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions; ``first_branch`` exposes the 1x1 branch (sFID)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x, return_first: bool = False):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        out = torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)
        return (out, b1) if return_first else out


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches; the TF graph's last block max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
            self.branch_pool(pool),
        ], 1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 (TF 2015 graph); forward(uint8 [N,3,H,W]) -> dict of pool/spatial/logits."""

    INPUT_SIZE = 299
    dims = {"pool": 2048, "spatial": SPATIAL_CHANNELS * 17 * 17, "logits": 1008}
    name = "inception-v3-tf-2015-12-05"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects uint8 images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), (self.INPUT_SIZE, self.INPUT_SIZE))      # (N, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))                 # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                      # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                     # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                                      # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                                # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                                # (N, 768, 17, 17)
        x, first = self.Mixed_6d(x, return_first=True)                                    # first: (N, 192, 17, 17)
        spatial = first[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)              # (N, 17*17*7) in h, w, c order
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))                 # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                                         # (N, 2048)
        logits = pool @ self.fc.weight.T                                                  # (N, 1008), no bias (ADM)
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


def load_inception(weights_path: str | None, device="cpu") -> InceptionV3FID:
    """Build the FID Inception and load ``weights_path`` (a local file; nothing is ever downloaded)."""
    if not weights_path or not os.path.isfile(os.path.expanduser(str(weights_path))):
        raise FileNotFoundError(
            f"Inception weights not found at {weights_path!r}. Expected a local copy of {INCEPTION_WEIGHTS_NAME} "
            "(pytorch-fid's FID weights; torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same "
            "file). Download it once on a machine with internet and set metrics.inception_weights=<path>.")
    sd = torch.load(os.path.expanduser(str(weights_path)), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}   # torchvision exports carry an unused aux head
    net = InceptionV3FID()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: not FID Inception-v3 weights; missing keys {missing[:5]}..., "
                         f"unexpected keys {unexpected[:5]}... (expected {INCEPTION_WEIGHTS_NAME})")
    return net.eval().requires_grad_(False).to(device)


class TinyExtractor(nn.Module):
    """A small fixed-seed random conv net with the same interface, for tests and CPU smoke runs only.

    Its numbers are not FID: they only show that the plumbing works. Dims: pool 16, spatial 2*4*4, logits 10.
    """

    dims = {"pool": 16, "spatial": 32, "logits": 10}
    name = "tiny-random"

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        x = resize_bilinear_tf1(images.float(), (16, 16)) / 128 - 1                       # (N, 3, 16, 16)
        h1 = torch.tanh(self.conv1(x))                                                    # (N, 8, 8, 8)
        h2 = torch.tanh(self.conv2(h1))                                                   # (N, 16, 4, 4)
        pool = h2.mean(dim=(2, 3))                                                        # (N, 16)
        spatial = h2[:, :2].permute(0, 2, 3, 1).flatten(1)                                # (N, 32)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool) * 3}


def build_extractor(kind: str, weights_path: str | None = None, device="cpu") -> nn.Module:
    """'inception' (needs a local weights file) | 'tiny' (tests/smoke runs; meaningless numbers)."""
    if kind == "inception":
        return load_inception(weights_path, device)
    if kind == "tiny":
        return TinyExtractor().eval().to(device)
    raise ValueError(f"metrics.extractor={kind!r}: expected 'inception' or 'tiny'")

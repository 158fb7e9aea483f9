"""The FID Inception-v3: TensorFlow's ``2015-12-05`` Inception graph, the network behind FID, the Inception score and
precision / recall in OpenAI's ADM evaluation suite (VAR's FID-50k), torch-fidelity and torchmetrics.

This module is our own implementation of that graph. The network is described as data (the stem layers and, per mixed
block, its branches of convolutions and its pooling branch) and built from that table by two generic modules. Module
and parameter names follow the naming of the PyTorch ports of the graph, so the weight file they publish,
``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's; the same file as pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``), loads into :class:`FIDInceptionV3` with ``strict=True``. With the same
weights its ``2048`` pool features and unbiased logits were checked once to be bit-identical, on the CPU for 32 to
301 px inputs, to those of torch-fidelity 0.4.0's extractor. torch-fidelity and the other FID packages are not used:
they all require torchvision.

What makes this graph the FID one rather than a textbook Inception-v3:

* the input is resized to 299 px by TensorFlow 1's bilinear resize (no half-pixel offset), then mapped to [-1, 1);
* the average pools of the mixed blocks leave the zero padding out of the mean (TensorFlow's ``SAME`` pooling);
* the pooling branch of the last block (``Mixed_7c``) takes a max, not an average;
* the classifier has 1008 outputs; the Inception-score logits are taken without its bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008


class InceptionFeatures(NamedTuple):
    pool: torch.Tensor  # (N, 2048) float32: pool_3, the FID and precision/recall features
    logits_unbiased: torch.Tensor  # (N, 1008) float32: pool_3 @ fc.weight.T, ADM's Inception-score logits


# ----------------------------------------------------------------------------------------------
# TensorFlow 1's bilinear resize
# ----------------------------------------------------------------------------------------------
def _tf1_taps(length_in: int, length_out: int, dtype: torch.dtype, device: torch.device):
    """Along one axis: for each output position, the two neighbouring input indices and the weight of the second.
    Output position ``i`` samples the input at ``i * length_in / length_out`` (the ratio rounded to float32 first, as
    TensorFlow does); PyTorch's ``interpolate`` would sample at ``(i + 0.5) * ratio - 0.5``."""
    ratio = torch.tensor(length_in / length_out, dtype=torch.float32)
    where = torch.arange(length_out, dtype=dtype, device=device) * ratio
    before = where.long()
    after = (before + 1).clamp_max(length_in - 1)  # the last row / column repeats past the edge
    return before, after, where - before.to(where.dtype)


def resize_bilinear_like_tensorflow1x(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N, C, H, W) float images to (N, C, size, size) as TensorFlow 1.x ``ResizeBilinear`` with
    ``align_corners=False`` does (the resize inside the FID graph); bit-exact on the CPU. Interpolates along the width
    first, then along the height, each as ``a + (b - a) * t``."""
    rows_a, rows_b, t_rows = _tf1_taps(x.shape[2], size, x.dtype, x.device)
    cols_a, cols_b, t_cols = _tf1_taps(x.shape[3], size, x.dtype, x.device)
    left, right = x[:, :, :, cols_a], x[:, :, :, cols_b]
    across = left + (right - left) * t_cols.view(1, 1, 1, size)
    upper, lower = across[:, :, rows_a, :], across[:, :, rows_b, :]
    return upper + (lower - upper) * t_rows.view(1, 1, size, 1)


# ----------------------------------------------------------------------------------------------
# The graph as a table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Conv:
    """One convolution unit of the graph: Conv2d without bias, BatchNorm (eps 1e-3), ReLU."""

    name: str
    out_channels: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)


def _same(name: str, out_channels: int, kh: int, kw: int | None = None) -> _Conv:
    """A stride-1 convolution padded to keep the spatial size (odd kernels)."""
    kw = kh if kw is None else kw
    return _Conv(name, out_channels, (kh, kw), 1, (kh // 2, kw // 2))


def _valid(name: str, out_channels: int, k: int, stride: int = 1) -> _Conv:
    """An unpadded square convolution."""
    return _Conv(name, out_channels, (k, k), stride)


# A branch is a chain of stages; a stage is one convolution, or a fork: several convolutions of the same input whose
# outputs are concatenated (the 1x3 / 3x1 pairs of the 8x8 blocks).
_Stage = _Conv | tuple[_Conv, ...]


@dataclass(frozen=True)
class _Pool:
    """A block's pooling branch. ``avg``: 3x3 average, stride 1, padding left out of the mean, then ``conv``;
    ``max``: 3x3 max, stride 1, padded, then ``conv``; ``reduce``: 3x3 max, stride 2, unpadded, no convolution."""

    kind: str
    conv: _Conv | None = None


@dataclass(frozen=True)
class _Mixed:
    name: str
    branches: tuple[tuple[_Stage, ...], ...]  # concatenated in this order, the pooling branch last
    pool: _Pool


_REDUCE = "reduce"  # a 3x3 stride-2 max pool between stem convolutions


def _mixed_35(name: str, pool_channels: int) -> _Mixed:
    """Mixed_5b-d, on the 35x35 grid."""
    return _Mixed(
        name,
        (
            (_same("branch1x1", 64, 1),),
            (_same("branch5x5_1", 48, 1), _same("branch5x5_2", 64, 5)),
            (_same("branch3x3dbl_1", 64, 1), _same("branch3x3dbl_2", 96, 3), _same("branch3x3dbl_3", 96, 3)),
        ),
        _Pool("avg", _same("branch_pool", pool_channels, 1)),
    )


def _mixed_17(name: str, width: int) -> _Mixed:
    """Mixed_6b-e, on the 17x17 grid: factorised 7x7 convolutions, ``width`` channels inside the branches."""
    return _Mixed(
        name,
        (
            (_same("branch1x1", 192, 1),),
            (_same("branch7x7_1", width, 1), _same("branch7x7_2", width, 1, 7), _same("branch7x7_3", 192, 7, 1)),
            (
                _same("branch7x7dbl_1", width, 1),
                _same("branch7x7dbl_2", width, 7, 1),
                _same("branch7x7dbl_3", width, 1, 7),
                _same("branch7x7dbl_4", width, 7, 1),
                _same("branch7x7dbl_5", 192, 1, 7),
            ),
        ),
        _Pool("avg", _same("branch_pool", 192, 1)),
    )


def _mixed_8(name: str, pool_kind: str) -> _Mixed:
    """Mixed_7b-c, on the 8x8 grid, with forked 1x3 / 3x1 ends."""
    return _Mixed(
        name,
        (
            (_same("branch1x1", 320, 1),),
            (_same("branch3x3_1", 384, 1), (_same("branch3x3_2a", 384, 1, 3), _same("branch3x3_2b", 384, 3, 1))),
            (
                _same("branch3x3dbl_1", 448, 1),
                _same("branch3x3dbl_2", 384, 3),
                (_same("branch3x3dbl_3a", 384, 1, 3), _same("branch3x3dbl_3b", 384, 3, 1)),
            ),
        ),
        _Pool(pool_kind, _same("branch_pool", 192, 1)),
    )


_STEM: tuple[_Conv | str, ...] = (  # 299 -> 35 px
    _valid("Conv2d_1a_3x3", 32, 3, stride=2),
    _valid("Conv2d_2a_3x3", 32, 3),
    _same("Conv2d_2b_3x3", 64, 3),
    _REDUCE,
    _same("Conv2d_3b_1x1", 80, 1),
    _valid("Conv2d_4a_3x3", 192, 3),
    _REDUCE,
)

_BLOCKS: tuple[_Mixed, ...] = (
    _mixed_35("Mixed_5b", 32),
    _mixed_35("Mixed_5c", 64),
    _mixed_35("Mixed_5d", 64),
    _Mixed(
        "Mixed_6a",
        (  # 35 -> 17 px
            (_valid("branch3x3", 384, 3, stride=2),),
            (
                _same("branch3x3dbl_1", 64, 1),
                _same("branch3x3dbl_2", 96, 3),
                _valid("branch3x3dbl_3", 96, 3, stride=2),
            ),
        ),
        _Pool(_REDUCE),
    ),
    _mixed_17("Mixed_6b", 128),
    _mixed_17("Mixed_6c", 160),
    _mixed_17("Mixed_6d", 160),
    _mixed_17("Mixed_6e", 192),
    _Mixed(
        "Mixed_7a",
        (  # 17 -> 8 px
            (_same("branch3x3_1", 192, 1), _valid("branch3x3_2", 320, 3, stride=2)),
            (
                _same("branch7x7x3_1", 192, 1),
                _same("branch7x7x3_2", 192, 1, 7),
                _same("branch7x7x3_3", 192, 7, 1),
                _valid("branch7x7x3_4", 192, 3, stride=2),
            ),
        ),
        _Pool(_REDUCE),
    ),
    _mixed_8("Mixed_7b", "avg"),
    _mixed_8("Mixed_7c", "max"),  # the FID graph's max here, where the paper's network averages
)


# ----------------------------------------------------------------------------------------------
# Modules built from the table
# ----------------------------------------------------------------------------------------------
class ConvUnit(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d (eps 1e-3) -> ReLU; parameters under ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, spec: _Conv):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, spec.out_channels, spec.kernel, stride=spec.stride, padding=spec.padding, bias=False
        )
        self.bn = nn.BatchNorm2d(spec.out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _reduce_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class MixedBlock(nn.Module):
    """A mixed block from its :class:`_Mixed` description: each branch runs on the block input, the outputs are
    concatenated along the channels in the table's order, the pooling branch last."""

    def __init__(self, in_channels: int, spec: _Mixed):
        super().__init__()
        self.pool_kind = spec.pool.kind
        self.plan: list[list[tuple[str, ...]]] = []  # per branch, per stage: the names of its convolutions
        self.out_channels = 0
        for branch in spec.branches:
            channels, stages = in_channels, []
            for stage in branch:
                fork = stage if isinstance(stage, tuple) else (stage,)
                for conv in fork:
                    self.add_module(conv.name, ConvUnit(channels, conv))
                stages.append(tuple(conv.name for conv in fork))
                channels = sum(conv.out_channels for conv in fork)
            self.plan.append(stages)
            self.out_channels += channels
        if spec.pool.conv is None:
            self.pool_conv_name = None
            self.out_channels += in_channels
        else:
            self.pool_conv_name = spec.pool.conv.name
            self.add_module(self.pool_conv_name, ConvUnit(in_channels, spec.pool.conv))
            self.out_channels += spec.pool.conv.out_channels

    def _pool_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_kind == _REDUCE:
            return _reduce_pool(x)
        if self.pool_kind == "avg":  # TensorFlow's SAME average pool: the padding is not counted
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return getattr(self, self.pool_conv_name)(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for stages in self.plan:
            h = x
            for names in stages:
                parts = [getattr(self, name)(h) for name in names]
                h = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            outputs.append(h)
        outputs.append(self._pool_branch(x))
        return torch.cat(outputs, 1)


class FIDInceptionV3(nn.Module):
    """The network; ``forward`` takes uint8 images (N, 3, H, W) of any size and returns :class:`InceptionFeatures`.
    Build it, then load a weight file (:func:`diffusers_var.evaluation.load_inception`)."""

    def __init__(self):
        super().__init__()
        channels = 3
        self.stem_plan: list[str] = []
        for layer in _STEM:
            if layer == _REDUCE:
                self.stem_plan.append(_REDUCE)
                continue
            self.add_module(layer.name, ConvUnit(channels, layer))
            self.stem_plan.append(layer.name)
            channels = layer.out_channels
        self.block_names: list[str] = []
        for spec in _BLOCKS:
            block = MixedBlock(channels, spec)
            self.add_module(spec.name, block)
            self.block_names.append(spec.name)
            channels = block.out_channels
        assert channels == POOL_DIM, channels
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        h = resize_bilinear_like_tensorflow1x(images.float(), INPUT_SIZE)
        h = (h - 128) / 128  # exact: dividing by a power of two, so the graph's multiply by 1/128 gives the same bits
        for name in self.stem_plan:
            h = _reduce_pool(h) if name == _REDUCE else getattr(self, name)(h)
        for name in self.block_names:
            h = getattr(self, name)(h)
        pool = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return InceptionFeatures(pool.float(), torch.mm(pool, self.fc.weight.T).float())

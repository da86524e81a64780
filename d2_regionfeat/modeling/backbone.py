"""
Backbones: a narrow ResNet-FPN for small models trained from scratch, and the ResNet with
the caffe max-pool stem of bottom-up-attention.

detectron2's ``build_resnet_backbone`` fixes the widths of ResNet-18/34 (64 to 512 channels,
``MODEL.RESNETS.RES2_OUT_CHANNELS`` must be 64). The builder here makes the same
BasicBlock networks with every width scaled from ``RES2_OUT_CHANNELS`` (res2 has that many
channels, each later stage twice the one before), out of detectron2's own ResNet, BasicBlock
and FPN classes, so that a whole Mask R-CNN fits in a few megabytes.
"""
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

from .checkpoint import register_checkpoint_conversion

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def build_narrow_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    A BasicBlock ResNet (``MODEL.RESNETS.DEPTH`` 18 or 34) whose stem has
    ``STEM_OUT_CHANNELS`` channels and whose res2..res5 have ``RES2_OUT_CHANNELS`` * 1, 2, 4, 8.
    Other keys as in ``build_resnet_backbone`` (``NORM``, ``OUT_FEATURES``,
    ``MODEL.BACKBONE.FREEZE_AT``).

    Returns:
        ResNet: outputs ``OUT_FEATURES`` among res2..res5, each (N, C, H/stride, W/stride).
    """
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(
            f"build_narrow_resnet_fpn_backbone supports MODEL.RESNETS.DEPTH "
            f"{sorted(BLOCKS_PER_STAGE)} (BasicBlock ResNets); got {depth}"
        )
    norm = cfg.MODEL.RESNETS.NORM
    in_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    stem = BasicStem(in_channels=input_shape.channels, out_channels=in_channels, norm=norm)
    stages = []
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(
        stem,
        stages,
        out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


@BACKBONE_REGISTRY.register()
def build_narrow_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """
    :func:`build_narrow_resnet` under an FPN (``MODEL.FPN.*`` keys, P6 by max-pooling P5), as
    detectron2's ``build_resnet_fpn_backbone`` does for its ResNets.
    """
    return FPN(
        bottom_up=build_narrow_resnet(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


class CaffeMaxPoolStem(BasicStem):
    """
    :class:`BasicStem` (7x7 conv stride 2, ReLU, 3x3 max pool stride 2) whose max pool is
    Caffe's: no padding, output size rounded up (``ceil_mode``), as in the original
    bottom-up-attention network. detectron2's stem pads by 1 and rounds down.
    """

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_resnet_caffe_maxpool_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    detectron2's ``build_resnet_backbone`` (same keys, parameters and initial weights) with
    :class:`CaffeMaxPoolStem` as its stem. Checkpoints of the PyTorch ports of
    bottom-up-attention load into it with their BatchNorm counters dropped
    (:mod:`d2_regionfeat.modeling.checkpoint`).
    """
    backbone = build_resnet_backbone(cfg, input_shape)
    stock = backbone.stem
    with torch.random.fork_rng(devices=[]):
        stem = CaffeMaxPoolStem(
            in_channels=input_shape.channels,
            out_channels=cfg.MODEL.RESNETS.STEM_OUT_CHANNELS,
            norm=cfg.MODEL.RESNETS.NORM,
        )
    if cfg.MODEL.BACKBONE.FREEZE_AT >= 1:
        stem.freeze()
    stem.load_state_dict(stock.state_dict())
    backbone.stem = stem
    register_checkpoint_conversion(backbone)
    return backbone

"""Distillation losses.

Every loss is an ``nn.Module`` whose ``forward`` takes student-side tensors first and teacher-side tensors second,
shaped ``(B, C, *spatial)`` with one, two or three spatial dimensions, and returns a scalar. Teacher tensors are
detached inside each loss, so no gradient can reach the teacher whatever the caller passes.
"""

import warnings

from .adversarial import AdversarialDistillationLoss as AdversarialDistillationLoss
from .adversarial import AdversarialObjective as AdversarialObjective
from .adversarial import HingeObjective as HingeObjective
from .adversarial import WGANGPObjective as WGANGPObjective
from .affinity import CIRKDLoss as CIRKDLoss
from .affinity import PairWiseAffinityLoss as PairWiseAffinityLoss
from .correlation import CrossLayerCorrelationLoss as CrossLayerCorrelationLoss
from .correlation import FeatureSimilarityDistillationLoss as FeatureSimilarityDistillationLoss
from .correlation import GraphFlowLoss as GraphFlowLoss
from .cross_arch import StageSpaceLoss as StageSpaceLoss
from .feature import AttentionTransferLoss as AttentionTransferLoss
from .feature import FactorTransferLoss as FactorTransferLoss
from .feature import FitNetLoss as FitNetLoss
from .feature import MGDLoss as MGDLoss
from .kdas import KDASAttentionLoss as KDASAttentionLoss
from .kdas import KDASSGMLoss as KDASSGMLoss
from .logit import ChannelWiseDistillationLoss as ChannelWiseDistillationLoss
from .logit import DISTLoss as DISTLoss
from .logit import LogitKDLoss as LogitKDLoss
from .logit import PixelWiseKDLoss as PixelWiseKDLoss
from .pseudo_label import PseudoLabelLoss as PseudoLabelLoss
from .region import EMKDRegionAffinityLoss as EMKDRegionAffinityLoss
from .region import IFVDLoss as IFVDLoss
from .region import InterClassDistanceLoss as InterClassDistanceLoss
from .region import PositionInformationLoss as PositionInformationLoss
from .supervised import StructureLoss as StructureLoss

# Names before the losses took the ``*Loss`` suffix: still resolved (configs' ``_target_`` included), with a warning.
_RENAMED = {
    "LogitKD": "LogitKDLoss",
    "PixelWiseKD": "PixelWiseKDLoss",
    "ChannelWiseDistillation": "ChannelWiseDistillationLoss",
    "DIST": "DISTLoss",
}


def __getattr__(name: str) -> type:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"kd_components.losses.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

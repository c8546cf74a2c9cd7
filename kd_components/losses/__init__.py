"""Distillation losses.

Every loss is an ``nn.Module`` whose ``forward`` takes student-side tensors first and teacher-side tensors second,
shaped ``(B, C, *spatial)`` with one, two or three spatial dimensions, and returns a scalar. Teacher tensors are
detached inside each loss, so no gradient can reach the teacher whatever the caller passes.
"""

from .adversarial import AdversarialDistillationLoss as AdversarialDistillationLoss
from .adversarial import AdversarialObjective as AdversarialObjective
from .adversarial import HingeObjective as HingeObjective
from .adversarial import WGANGPObjective as WGANGPObjective
from .affinity import CIRKDLoss as CIRKDLoss
from .affinity import PairWiseAffinityLoss as PairWiseAffinityLoss
from .correlation import CrossLayerCorrelationLoss as CrossLayerCorrelationLoss
from .correlation import FeatureSimilarityDistillationLoss as FeatureSimilarityDistillationLoss
from .correlation import GraphFlowLoss as GraphFlowLoss
from .feature import AttentionTransferLoss as AttentionTransferLoss
from .feature import FactorTransferLoss as FactorTransferLoss
from .feature import FitNetLoss as FitNetLoss
from .feature import MGDLoss as MGDLoss
from .kdas import KDASAttentionLoss as KDASAttentionLoss
from .kdas import KDASSGMLoss as KDASSGMLoss
from .kdas import StructureLoss as StructureLoss
from .logit import DIST as DIST
from .logit import ChannelWiseDistillation as ChannelWiseDistillation
from .logit import LogitKD as LogitKD
from .logit import PixelWiseKD as PixelWiseKD
from .region import EMKDRegionAffinityLoss as EMKDRegionAffinityLoss
from .region import IFVDLoss as IFVDLoss
from .region import InterClassDistanceLoss as InterClassDistanceLoss
from .region import PositionInformationLoss as PositionInformationLoss

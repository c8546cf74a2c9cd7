"""Trainable building blocks used by distillation losses: paraphraser / translator adapters and discriminators."""

from .discriminators import PatchDiscriminator, SelfAttentionBlock, SelfAttentionDiscriminator
from .paraphraser import Paraphraser, Translator

__all__ = ["Paraphraser", "PatchDiscriminator", "SelfAttentionBlock", "SelfAttentionDiscriminator", "Translator"]

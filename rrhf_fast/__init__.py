"""rrhf_fast: RRHF preference alignment with fused kernels and prefix-shared candidates."""

from rrhf_fast import reference
from rrhf_fast.loss import rrhf_loss, rrhf_loss_from_logits, sequence_scores
from rrhf_fast.reference import RRHFOutput

__all__ = ["RRHFOutput", "reference", "rrhf_loss", "rrhf_loss_from_logits", "sequence_scores"]

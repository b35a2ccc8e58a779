"""rrhf_fast: RRHF preference alignment with fused kernels and prefix-shared candidates."""

from rrhf_fast import reference
from rrhf_fast.batch import PackedBatch, pack_batch
from rrhf_fast.loss import RRHFOutput, rrhf_loss, rrhf_loss_from_logits, rrhf_loss_from_logprobs, sequence_scores
from rrhf_fast.checked import model_loss
from rrhf_fast.prefix import prefix_forward

__all__ = [
    "PackedBatch",
    "RRHFOutput",
    "model_loss",
    "pack_batch",
    "prefix_forward",
    "reference",
    "rrhf_loss",
    "rrhf_loss_from_logits",
    "rrhf_loss_from_logprobs",
    "sequence_scores",
]

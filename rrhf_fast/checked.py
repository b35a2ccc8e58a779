"""The loss a caller wants: the RRHF loss of a model on a batch through the path that is exact on that model.

Three files, one direction: rrhf_fast.prefix holds the paths (what each prefix mode and head computes),
rrhf_fast.probe the check (which path gives what the model itself gives, here), and this module composes them.
"""

import torch

from rrhf_fast import probe
from rrhf_fast.batch import PackedBatch
from rrhf_fast.prefix import batch_loss


def model_loss(model, batch: PackedBatch, *, mode: str = "auto", **loss_options):
    """The RRHF loss of `model` on `batch`, through the mode and head that rrhf_fast.probe found exact on this model
    (the check runs at the first call for a model, mode, checkpointing setting and set of trainable parameters, on a
    short batch cut from this one, gradients included where gradients are enabled; an explicit mode that fails it
    raises ValueError naming the mode that passed). loss_options go to rrhf_loss (length_penalty, rank_weight,
    sft_weight, margin, sft_reduction, backend). Returns rrhf_loss's output (loss, rank_loss, sft_loss, scores)."""
    plan = probe.plan(model, batch, mode, gradients=torch.is_grad_enabled())
    return batch_loss(model, batch, plan.mode, plan.head, **loss_options)

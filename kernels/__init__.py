"""Triton kernels of rrhf_fast, imported as `rrhf_fast.kernels`: plain launch functions, no autograd.

- logprob: per-token log-probability from a [rows, V] logits buffer, its backward, and logprob_step_ (both
           over one chunk of the one-sweep loop)
- rank:    per-group length-normalised scores, hinge ranking and SFT terms, and the token gradients

The same names and signatures as rrhf_fast.torch_ops: rrhf_fast.head's loops over the LM head (cuBLAS
matmuls over chunks of rows) and rrhf_fast.loss's autograd.Functions take this module as their `ops` for
backend="triton". Importing it queries no device, so it works on a machine without a GPU (the kernels then run
under TRITON_INTERPRET=1 on CPU tensors).
"""

from rrhf_fast.kernels.logprob import UPCAST_LOGITS, logprob_bwd, logprob_fwd, logprob_step_
from rrhf_fast.kernels.rank import rank_bwd, rank_fwd

__all__ = ["UPCAST_LOGITS", "logprob_fwd", "logprob_bwd", "logprob_step_", "rank_fwd", "rank_bwd"]

"""Triton kernels of rrhf_fast, imported as `rrhf_fast.kernels`: plain launch functions, no autograd.

- logprob:        per-token log-probability from materialised [N, V] logits, and its backward
- linear_logprob: the same from hidden states and the LM head, never building the [N, V] logits
- rank:           per-group length-normalised scores, hinge ranking and SFT terms, and the token gradients

Importing this module queries no device, so it works on a machine without a GPU (kernels then run under
TRITON_INTERPRET=1 on CPU tensors).
"""

from rrhf_fast.kernels.linear_logprob import linear_logprob_bwd, linear_logprob_fwd
from rrhf_fast.kernels.logprob import logprob_bwd, logprob_fwd
from rrhf_fast.kernels.rank import rank_bwd, rank_fwd

__all__ = ["logprob_fwd", "logprob_bwd", "linear_logprob_fwd", "linear_logprob_bwd", "rank_fwd", "rank_bwd"]

"""Shared set-up for tests and benchmark suites: Triton kernels run through the interpreter on CPU tensors when there is no GPU."""

import os

import torch

# The interpreter is chosen when a kernel is decorated, so this must happen before rrhf_fast.kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

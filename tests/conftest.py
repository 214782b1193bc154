import os

import torch

# Triton kernels run under the interpreter on CPU tensors; the flag must be set before the
# kernel module is imported (triton reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import os

import torch

# Triton kernels run under the interpreter on CPU tensors; the flag must be set before the
# kernel module is imported (shared/notes/cpu_feasibility.md).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Per-dtype tolerances (atol, rtol) for normport vs torch.nn comparisons."""

import torch

OUTPUT = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (4e-3, 2e-3),
}
# Parameter gradients sum over many elements: a looser relative tolerance.
GRAD = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-1, 3e-2),
    torch.float16: (1e-2, 1e-2),
}

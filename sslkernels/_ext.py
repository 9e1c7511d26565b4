"""Loads the compiled extension and answers what it was built with."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.sslkernels.*)
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "sslkernels' compiled extension is missing: install the package with "
        "`pip install -e .` (or run tools/build_dev.sh for an in-tree build)"
    ) from exc


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(_C.cuda_built())


def op_names() -> list[str]:
    """Names of every op in the ``torch.ops.sslkernels`` namespace."""
    return sorted(n for n in dir(torch.ops.sslkernels) if not n.startswith("_") and
                  isinstance(getattr(torch.ops.sslkernels, n), torch._ops.OpOverloadPacket))

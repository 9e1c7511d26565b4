"""Shared test set-up. Triton kernels run on CPU through the interpreter when there is no GPU;
the variable must be set before triton is first imported, hence here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

def triton_interpreter_problem():
    """Why the Triton interpreter cannot run the kernels here, or None.

    triton 3.6's interpreter turns 1-element arrays into loop bounds with int(), which numpy
    2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.8
    squeezes them first. Compiled kernels (GPU, offline gate) are not affected.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import numpy
    import triton

    def version(mod):
        return tuple(int(x) for x in mod.__version__.split(".")[:2] if x.isdigit())

    if version(triton) < (3, 8) and version(numpy) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run with numpy "
                f"{numpy.__version__} (int() of 1-element arrays); use numpy<2.4 to run the "
                f"Triton kernels on CPU with this triton")
    return None


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"torch {torch.__version__}, CUDA device: {cuda}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")

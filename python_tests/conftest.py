"""Shared test set-up. Triton kernels run on CPU through the interpreter when there is no GPU;
the variable must be set before triton is first imported, hence here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"torch {torch.__version__}, CUDA device: {cuda}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")

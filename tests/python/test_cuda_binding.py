"""The CUDA binding loads and answers on a machine without a GPU, and refuses cleanly."""

import pytest

import strata
from strata import _C


def test_cuda_binding_without_a_device():
    ok, reason = _C.cuda_available()
    info = _C.cuda_info()  # never raises
    assert isinstance(info, dict)
    if ok:
        pytest.skip("a CUDA device is present: the GPU checks live in benchmarks/gpu_check.sh")
    assert reason  # says why: not compiled, no driver, no device
    with pytest.raises(strata.StrataError, match="CUDA not available"):
        _C.CudaUpdater(16)

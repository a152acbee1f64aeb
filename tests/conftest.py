"""Suite-wide isolation of torch's global default dtype.

pytest imports every test module before running any test, so a module that calls
``torch.set_default_dtype(torch.float64)`` at import would silently turn every other module's
tensors and models into float64 (and break tests that mix them with float32 data). Here each
module keeps the default dtype it set for itself: the dtype in force right after a module is
collected is recorded, the global default is put back, and a module-scoped autouse fixture sets the
recorded dtype while that module's tests run and restores the default afterwards (also undoing any
change a test made without restoring it).
"""

from __future__ import annotations

import pytest
import torch

_BASE_DTYPE = torch.get_default_dtype()
_MODULE_DTYPE: dict[str, torch.dtype] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    yield  # the module is imported while its report is made
    if isinstance(collector, pytest.Module):
        _MODULE_DTYPE[str(collector.path)] = torch.get_default_dtype()
        torch.set_default_dtype(_BASE_DTYPE)


@pytest.fixture(autouse=True, scope="module")
def _module_default_dtype(request):
    torch.set_default_dtype(_MODULE_DTYPE.get(str(request.path), _BASE_DTYPE))
    yield
    torch.set_default_dtype(_BASE_DTYPE)

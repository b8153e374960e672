import os

import pytest
from hypothesis import settings

import retain
from retain import _native

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every fresh kernel output starts as NaN, so an element a kernel forgets to write fails."""
    monkeypatch.setattr(_native, "poison_outputs", True)
    yield


# Every CPU kernel test runs once per CPU capability this machine can run (csrc/common/README.md):
# a module of kernel tests asks for it with `pytestmark = pytest.mark.usefixtures("cpu_capability")`,
# and its test ids end in [default], [avx2] or [avx512].
CPU_CAPABILITIES = retain.cpu_capabilities()


def pytest_generate_tests(metafunc):
    if "cpu_capability" in metafunc.fixturenames:
        metafunc.parametrize("cpu_capability", CPU_CAPABILITIES, indirect=True)


@pytest.fixture
def cpu_capability(request):
    """Runs the test with the CPU kernels' build for the capability in request.param."""
    before = _native.cpu_capability()
    _native.set_cpu_capability(request.param)
    yield request.param
    _native.set_cpu_capability(before)

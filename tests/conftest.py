import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# The suite checks the float32 CPU path against its references; what needs a GPU is in benchmarks/gpu_checklist.sh.
# On a machine with GPUs, train.py would otherwise pick CUDA and mixed precision by itself (and torchrun tests
# would start more processes than GPUs), so the tests hide the GPUs from themselves and from their subprocesses.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# built tiny bases are cached across runs (tiny_base.tiny_base_cache): the suite keeps its own, shared by its tests
# and their subprocesses, and removed at the end
os.environ["MOELORA_CACHE"] = tempfile.mkdtemp(prefix="moelora_test_cache_")
atexit.register(shutil.rmtree, os.environ["MOELORA_CACHE"], ignore_errors=True)

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is flat files at the top level, not a package

# ../shared holds the real fixtures (tiny checkpoints, tokenizer, datasets); MOELORA_SHARED overrides where
SHARED = Path(os.environ.get("MOELORA_SHARED", ROOT.parent / "shared"))


def shared_path(relative: str) -> Path:
    """A fixture under ../shared; skip the test (or fail, in CI) with the reason when it is absent."""
    p = SHARED / relative
    if not p.exists():
        msg = f"fixture {p} not found: put the project's shared/ folder beside it or set MOELORA_SHARED"
        if os.environ.get("MOELORA_REQUIRE_SHARED"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # the tensors here are tiny: a second thread only adds synchronisation, which costs seconds per test
    # when another process holds a core
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~20 s on a 2-core CPU; `-m 'not slow'` leaves them out while "
                                       "working (the README's command, and CI, run everything)")


def run_in_group(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, killed whole on timeout: torchrun's workers, or a script's
    children, must not outlive a test that gave up on them."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=kwargs.pop("stdout", subprocess.PIPE),
                            stderr=kwargs.pop("stderr", subprocess.PIPE), **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


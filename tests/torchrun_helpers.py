"""Run a test worker under torchrun (2 gloo processes on CPU), as users launch DDP."""
import os
import subprocess
import sys
from pathlib import Path


def torchrun(worker: Path, out: Path, nproc: int = 2, timeout: int = 240, check: bool = True):
    """The finished process; with check, assert it succeeded (its stderr tail otherwise)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(worker).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(worker), str(out)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc

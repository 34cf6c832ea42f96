"""A torchrun worker for the tests: runs several ``recycle`` commands in one process group, optionally with a fault.

``python -m torch.distributed.run --nproc-per-node 2 -m tests.dist_worker '[["meta-train", ...], ["eval", ...]]'``

``RECYCLE_TEST_FAULT=ACTION:RANK:STEP`` makes rank RANK, when meta-training reaches step STEP (0-based), ``kill``
itself with SIGKILL, ``raise`` an exception, or ``hang`` (sleep for an hour).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch


def _inject(fault: str) -> None:
    import recycle.meta as meta

    action, rank, at = fault.split(":")
    if int(os.environ["RANK"]) != int(rank):
        return
    real = meta.cyclic_lr

    def hooked(step: int, *args, **kwargs):
        if step == int(at):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "raise":
                raise RuntimeError(f"injected failure at step {step}")
            elif action == "hang":
                time.sleep(3600)
        return real(step, *args, **kwargs)

    meta.cyclic_lr = hooked


def main() -> int:
    torch.set_num_threads(1)
    from recycle import cli, distributed

    if os.environ.get("RECYCLE_TEST_FAULT"):
        _inject(os.environ["RECYCLE_TEST_FAULT"])
    distributed.setup("cpu")  # join once; every command below reuses the group
    for args in json.loads(sys.argv[1]):
        code = cli.main(args)
        if code:
            return code
    distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

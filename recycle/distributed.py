"""Multi-process runs under ``torchrun``: the only module that knows about ranks.

``torchrun --nproc-per-node N [--nnodes M ...] -m recycle COMMAND ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``) for every process. `setup` reads them, joins the process group
(NCCL when the rank runs on a GPU, ``cuda:LOCAL_RANK``; gloo on the CPU) and returns the rank's device. Without those
variables nothing is initialised and every helper here is the identity for one process, so a plain run behaves
exactly as it did before ranks existed.

Every collective runs with the process group's timeout (``RECYCLE_DIST_TIMEOUT`` seconds, default 1800). A
collective that fails, because another rank raised, was killed or hangs past the timeout, raises
`DistributedError` with a message that names this rank and says what to look for, so the command exits non-zero
instead of waiting forever. (Under ``torchrun`` the first rank to exit with an error also makes the launcher stop
the others.)

Work is split in a way that does not depend on the number of ranks: items are dealt round-robin
(`shard_indices`), results are gathered back into the serial order (`gather_ordered`), and randomness per item comes
from `derive_seed` over the item's global index, never from a stream that a rank would consume in its own order.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "TIMEOUT_ENV",
    "DEFAULT_TIMEOUT_S",
    "launched",
    "timeout",
    "setup",
    "teardown",
    "rank",
    "world_size",
    "is_main",
    "shard_indices",
    "gather_ordered",
    "all_gather_object",
    "all_reduce_sum_",
    "barrier",
    "derive_seed",
    "wait_until",
]

_logger = logging.getLogger(__name__)
T = TypeVar("T")

TIMEOUT_ENV = "RECYCLE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
MAX_TIMEOUT_S = 7 * 24 * 3600
_owned = False  # whether `setup` initialised the process group (and the matching `teardown` destroys it)
_users = 0  # `setup` calls not yet matched by `teardown` while the group is ours


class DistributedError(RuntimeError):
    """Joining the process group or a collective failed; the message names the rank and the likely cause."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout() -> _dt.timedelta:
    """The timeout of every collective: ``RECYCLE_DIST_TIMEOUT`` seconds (default 1800, at most 7 days).

    Raises:
        ValueError: the variable is not a finite number of seconds in that range.
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise ValueError(
            f"{TIMEOUT_ENV}={raw!r} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S} (7 days)"
        )
    return _dt.timedelta(seconds=seconds)


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "0")
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer; start the command with torchrun") from None
    if value < 0:
        raise DistributedError(f"{name}={raw!r} must not be negative")
    return value


def _rank_device(device: str, local_rank: int) -> str:
    """``auto`` or ``cuda`` -> this rank's GPU ``cuda:LOCAL_RANK`` (``auto`` -> ``cpu`` without CUDA); an explicit
    device such as ``cuda:1`` or ``cpu`` is kept."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "cpu" if device == "auto" else device


def setup(device: str = "auto") -> str:
    """Join the process group when launched by torchrun and return this rank's device; otherwise return `device`.

    Reuses a process group that is already initialised (e.g. by a script that calls several commands); calls nest,
    and the `teardown` matching the `setup` that joined leaves the group.

    Raises:
        DistributedError: the environment is inconsistent or the rendezvous failed (names the rank and the cause).
    """
    global _owned, _users
    if dist.is_available() and dist.is_initialized():
        _users += _owned
        return _rank_device(device, _env_int("LOCAL_RANK"))
    if not launched():
        return device
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run without torchrun")
    r, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= r < world:
        raise DistributedError(f"RANK={r} is outside WORLD_SIZE={world}")
    dev = _rank_device(device, local)
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise DistributedError(f"rank {r} of {world}: --device {device} asks for CUDA, which is not available here")
    kwargs: dict[str, Any] = {}
    if cuda:
        torch.cuda.set_device(torch.device(dev))
        kwargs["device_id"] = torch.device(dev)
        # Raise a timed-out NCCL collective as an exception on the waiting thread (our clear message), not an abort.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=timeout(), **kwargs)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"rank {r} of {world} could not join the process group ({backend}, "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {_first_line(e)}"
        ) from e
    _owned, _users = True, 1
    _logger.info(
        "rank %d of %d on %s (%s backend, collective timeout %.0f s)", r, world, dev, backend, timeout().total_seconds()
    )
    return dev


def teardown() -> None:
    """Leave the process group if `setup` joined it (after a successful command; a failed rank just exits)."""
    global _owned, _users
    if not _owned:
        return
    _users -= 1
    if _users <= 0:
        if dist.is_initialized():
            dist.destroy_process_group()
        _owned, _users = False, 0


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one that writes shared files (checkpoints, logs, manifests, reports)."""
    return rank() == 0


def shard_indices(n: int) -> range:
    """This rank's share of items ``0..n-1``, dealt round-robin: rank r gets r, r + N, r + 2N, ..."""
    return range(rank(), n, world_size())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _collective(what: str, fn: Callable[..., T], *args, **kwargs) -> T:
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # torch.distributed.DistError and backend errors are RuntimeErrors
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} failed ({_first_line(e)}). Another rank probably failed, was "
            f"killed, or did not reach this point within the timeout ({timeout().total_seconds():.0f} s, set by "
            f"{TIMEOUT_ENV}); see the other ranks' messages."
        ) from e


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), indexed by rank; ``[obj]`` without a process group."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective("gathering results", dist.all_gather_object, out, obj)
    return out


def gather_ordered(local: Sequence[T], n: int) -> list[T]:
    """Reassemble per-item results computed over `shard_indices(n)` into the serial order ``0..n-1`` on every
    rank. `local` holds this rank's results, in the order of its shard."""
    local = list(local)
    if len(local) != len(shard_indices(n)):
        raise ValueError(f"rank {rank()} has {len(local)} results for a shard of {len(shard_indices(n))} items")
    if world_size() == 1:
        return local
    out: list[Any] = [None] * n
    for r, part in enumerate(all_gather_object(local)):
        for i, value in zip(range(r, n, world_size()), part):
            out[i] = value
    return out


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum `tensors` over all ranks, in place (one flat buffer per call); a no-op without a process group.

    Every rank must pass tensors of the same shapes, dtypes and order (e.g. the gradients of the same parameters).
    """
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective("summing gradients", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    """Wait until every rank gets here (with the collective timeout); a no-op without a process group."""
    if world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        _collective("waiting for the other ranks", dist.barrier, device_ids=[torch.cuda.current_device()])
    else:
        _collective("waiting for the other ranks", dist.barrier)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. ``(seed, step, global episode index)``): the same on every rank, for
    any number of ranks, and well spread even for neighbouring inputs."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def wait_until(ready: Callable[[], Optional[int]], what: str, poll_s: float = 1.0) -> None:
    """Poll `ready` (returns the number of items still missing, 0 or None when done) until done; raise
    `DistributedError` when nothing new arrived for the collective timeout.

    For rank 0 waiting on files that other ranks write (no collective, so a rank busy with a long item never
    times out a barrier)."""
    limit = timeout().total_seconds()
    missing, since = ready(), time.monotonic()
    while missing:
        time.sleep(poll_s)
        now_missing = ready()
        if now_missing != missing:
            missing, since = now_missing, time.monotonic()
        elif time.monotonic() - since > limit:
            raise DistributedError(
                f"rank {rank()} of {world_size()}: {what}: {missing} still missing and nothing "
                f"new for {limit:.0f} s ({TIMEOUT_ENV}); did another rank fail?"
            )

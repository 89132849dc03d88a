"""Data-parallel ``ebft prune`` under ``torchrun``: each block's training batches split over processes.

``torchrun --nproc-per-node K -m ebft prune ...`` starts K processes that each hold the whole model
and walk the blocks in lockstep. Per block:

* every process runs the dense-target pass over all calibration windows itself, so the pruner's
  statistics, and hence the masks, are exactly those of a single-process run (all-reducing the
  statistics instead would change their summation order, and a near-tie could flip a mask);
* each optimizer step's batch (the same windows, in the same order, as a single-process run) is
  cut into K contiguous shards, one per process; each process weights its shard's loss by its share
  of the batch's tokens, and the gradients are summed over the processes (one flat all-reduce), so
  every process steps with the gradient of the whole batch (up to floating-point summation order);
* the tuned block's state is broadcast from rank 0, so the processes never drift apart;
* the no-grad passes that follow (losses, propagation to the next block) are split by windows too,
  and the outputs gathered into every process's buffer.

Only rank 0 writes checkpoints, the model and ``report.json``, and shows logs and progress bars.
The backend is gloo on the CPU and NCCL on CUDA, one GPU per process (``cuda:LOCAL_RANK``).

A failure on one process ends the job: torchrun stops the others, and a process whose peer is gone
fails its next collective with :class:`PeerError` instead of waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ebft.errors import EbftError, UsageError

logger = logging.getLogger(__name__)

#: How long a collective may wait for the slowest process (rank 0 also writes checkpoints).
TIMEOUT = datetime.timedelta(minutes=60)


class PeerError(EbftError):
    """A collective failed because another process of the job stopped."""


def torchrun_world(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun with more than one process, else ``None``."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise UsageError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK must be whole numbers; got "
                         f"{env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
    if world <= 1:
        return None
    if not (0 <= rank < world and local >= 0):
        raise UsageError(f"torchrun gave RANK {rank} for WORLD_SIZE {world}; launch with torchrun --nproc-per-node K")
    return rank, world, local


def process_device(device: str, local_rank: int) -> torch.device:
    """The device of process ``local_rank`` for ``--device``: the CPU, or its own GPU ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise UsageError(f"torchrun runs support --device cpu (gloo) or cuda (NCCL); got --device {device}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= count:
        raise EbftError(f"--device cuda under torchrun needs one GPU per process: LOCAL_RANK {local_rank}, "
                        f"but torch sees {count} CUDA device(s); lower --nproc-per-node or use --device cpu")
    return torch.device("cuda", local_rank)


@dataclass
class DistContext:
    """This process's place in the job and the collectives the walk uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> slice:
        """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one; may be empty)."""
        r = self.rank if rank is None else rank
        return slice(r * n // self.world_size, (r + 1) * n // self.world_size)

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # DistBackendError and gloo/NCCL connection failures
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerError(f"rank {self.rank}: {what} failed, another process of the torchrun job stopped "
                            f"({first}); its own error is above") from exc

    def barrier(self) -> None:
        import torch.distributed as dist

        with self._collective("barrier"):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; every process gets the same result."""
        import torch.distributed as dist

        with self._collective("all-reduce"):
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_grads_(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over the processes (a missing gradient counts as zero)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0, device=self.device)
        self.all_reduce_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            chunk = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` (in place, any dtype) with rank 0's values."""
        import torch.distributed as dist

        with self._collective("broadcast"):
            for t in tensors:
                if t.dtype == torch.bool:  # not every backend sends bools
                    as_bytes = t.to(torch.uint8)
                    dist.broadcast(as_bytes, src=0)
                    t.copy_(as_bytes.bool())
                else:
                    dist.broadcast(t, src=0)

    def share_rows_(self, buffer: torch.Tensor, chunk_bytes: int = 256 * 2**20) -> None:
        """Give every process all rows of ``buffer`` (dim 0), each process having filled its :meth:`shard`.

        ``buffer`` may live on the CPU under NCCL: it then travels through the GPU in chunks.
        """
        import torch.distributed as dist

        n = buffer.shape[0]
        row_bytes = max(1, buffer[0].numel() * buffer.element_size()) if n else 1
        step = max(1, chunk_bytes // row_bytes)
        via_device = self.backend == "nccl" and buffer.device != self.device
        with self._collective("sharing activations"):
            for r in range(self.world_size):
                part = self.shard(n, r)
                for start in range(part.start, part.stop, step):
                    rows = buffer[start : min(part.stop, start + step)]
                    if not via_device:
                        dist.broadcast(rows, src=r)
                        continue
                    moved = rows.to(self.device)
                    dist.broadcast(moved, src=r)
                    if r != self.rank:
                        rows.copy_(moved)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str, env: Mapping[str, str] | None = None) -> DistContext | None:
    """Join the torchrun job described by the environment, or return ``None`` for a single process.

    ``device`` is ``--device``; with CUDA each process uses ``cuda:LOCAL_RANK`` and NCCL, on the CPU gloo.
    """
    world = torchrun_world(env)
    if world is None:
        return None
    rank, size, local = world
    dev = process_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    import torch.distributed as dist

    if not dist.is_available():
        raise EbftError("this torch build has no torch.distributed; run a single process instead of torchrun")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=TIMEOUT, **kwargs)
    ctx = DistContext(rank, size, local, dev, backend)
    logger.info("process %d of %d (%s on %s)", rank, size, backend, dev)
    return ctx

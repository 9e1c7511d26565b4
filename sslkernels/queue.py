"""Ring-buffer negative queue for MoCo-style training: :class:`NegativeQueue`.

The official MoCo code keeps K past keys as a (D, K) buffer, clones it every step to compute the
logits, reads the pointer back to the host (``int(ptr)``) and asserts ``K % batch_size == 0``;
lightly silently drops the keys that do not fit before the end of the buffer. Here:

* the queue is a (K, D) buffer read in place by :func:`sslkernels.fused_info_nce` (no copy);
* :meth:`NegativeQueue.enqueue` is one call of the mutating op
  ``torch.ops.sslkernels.queue_enqueue_`` (one kernel launch on CUDA, one parallel pass on CPU)
  that reads the pointer on the device, wraps around, normalizes the keys on the way in and
  advances the pointer and the fill count on the device: no host synchronization, no assert,
  nothing dropped;
* buffer, pointer and fill count are module buffers, so ``state_dict``, ``.to()``,
  checkpointing and DDP's buffer broadcast carry them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import _ext, _validate  # noqa: F401  (_ext loads the compiled ops)
from .distributed import gather_no_grad

__all__ = ["NegativeQueue"]

INITS = ("random", "empty")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


_ENQUEUE = torch.ops.sslkernels.queue_enqueue_.default


@torch.library.register_fake("sslkernels::queue_enqueue_")
def _enqueue_fake(buffer, ptr, fill, keys, normalize):
    return None


class NegativeQueue(nn.Module):
    r"""A (K, D) ring buffer of past keys with a device-side pointer.

    Args:
        size: K, the number of slots (MoCo: 65536). Any K >= 1; no relation to the batch size
            is required.
        dim: D, the key width.
        dtype: storage dtype of the buffer: float32, bfloat16 or float16 (float64 also works).
            Keys of any float dtype are converted on the way in.
        device: where the buffer lives (default: torch's default device).
        normalize: L2-normalize keys on enqueue (``F.normalize`` semantics: ``x / max(||x||,
            1e-12)``, computed in float32 - float64 if the keys or the buffer are float64 - then
            rounded to the storage dtype). MoCo's encoder already normalizes its keys; the
            queue normalizing again costs nothing measurable and makes any key safe to store.
        init: ``"random"`` - MoCo's initialization: standard normal rows, normalized (to the
            storage dtype after normalizing in float32), fill count K (every row is a valid
            negative from the first step, as in the official code). ``"empty"`` - zeros, fill
            count 0, pointer 0: rows are written from 0 upward, so until the first wrap the
            filled rows are the prefix ``buffer[:fill]`` (see :meth:`negatives_filled`).
        generator: optional ``torch.Generator`` for ``init="random"``.

    Buffers (all in ``state_dict``):
        buffer: (K, D) ``dtype`` - the keys.
        ptr: 0-d int64 - the slot the next key goes to, in [0, K).
        fill: 0-d int64 - how many slots hold keys, in [0, K].

    Example (MoCo v2 step)::

        queue = NegativeQueue(65536, 128, device="cuda")
        loss = fused_info_nce(q, k.detach(), negatives=queue.negatives, temperature=0.2)
        loss.backward()
        queue.enqueue(k.detach(), gather=True)
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, normalize: bool = True,
                 init: str = "random", generator: torch.Generator | None = None) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if dtype not in STORAGE_DTYPES:
            raise TypeError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype}")
        _validate.choice("init", init, INITS)
        self.size = size
        self.dim = dim
        self.normalize = bool(normalize)
        self.init = init
        if init == "random":
            work = torch.float64 if dtype == torch.float64 else torch.float32
            rows = torch.randn(size, dim, dtype=work, device=device, generator=generator)
            buffer = nn.functional.normalize(rows, dim=1).to(dtype)
            filled = size
        else:
            buffer = torch.zeros(size, dim, dtype=dtype, device=device)
            filled = 0
        self.register_buffer("buffer", buffer)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=buffer.device))
        self.register_buffer("fill", torch.full((), filled, dtype=torch.long,
                                                device=buffer.device))
        # Host-side mirror of `fill`, derived from the batch shapes that enqueue sees (shapes are
        # host metadata, so keeping it costs no sync). None when unknown (after load_state_dict,
        # or after an enqueue traced by torch.compile); negatives_filled() then reads `fill`.
        self._known_fill: int | None = filled

    # -----------------------------------------------------------------------------------------
    @property
    def negatives(self) -> torch.Tensor:
        """The (K, D) buffer itself - no copy - for ``fused_info_nce(q, k, negatives=...)``.

        All K rows, whatever the fill count: with ``init="random"`` every row is a valid
        (random) negative, as in MoCo. Row order does not matter to InfoNCE.
        """
        return self.buffer

    def negatives_filled(self) -> torch.Tensor:
        """The filled rows ``buffer[:fill]`` as a view (no copy), shape (fill, D).

        Rows are written from slot 0 upward until the first wrap, and once the queue has wrapped
        every row is filled, so the filled rows are always a prefix. A view needs its length on
        the host: the queue keeps a host-side count updated from the batch shapes enqueue sees
        (no sync), so this is sync-free in eager use. After ``load_state_dict``, or after
        enqueues run under ``torch.compile``, the count is unknown and this call reads ``fill``
        once (one host synchronization on CUDA), then caches it. Writing to ``fill`` by hand
        outside ``enqueue``/``load_state_dict`` (or a DDP buffer broadcast between ranks whose
        queues differ) is not tracked: call :meth:`forget_fill` after. On an empty queue the
        result is (0, D), for which ``fused_info_nce`` gives the loss of the positive alone (0).
        """
        if self._known_fill is None:
            self._known_fill = int(self.fill)  # the one documented host read
        if self._known_fill >= self.size:
            return self.buffer
        return self.buffer[: self._known_fill]

    def forget_fill(self) -> None:
        """Drop the host-side fill count; the next :meth:`negatives_filled` reads ``fill``."""
        self._known_fill = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_fill = None

    # -----------------------------------------------------------------------------------------
    def enqueue(self, keys: torch.Tensor, gather: bool = False, *,
                group: dist.ProcessGroup | None = None, check_finite: bool = False) -> None:
        """Write ``keys`` into the queue: key i goes to slot (ptr + i) mod K.

        One op call (one kernel launch on CUDA); the pointer is read and advanced on the device
        and ``fill`` becomes min(K, fill + B). Wrap-around is handled; a batch larger than K keeps
        its last K keys, in ring order, so the next enqueue continues where a key-by-key enqueue
        would. No host synchronization unless ``check_finite=True``.

        Args:
            keys: (B, D) float16, bfloat16, float32 or float64 on the queue's device, B >= 1.
                No gradient is recorded (keys are detached).
            gather: with an initialized ``torch.distributed`` process group, first all-gather
                the keys of every rank (rank order; every rank must pass the same B) so all ranks
                hold the same queue, as MoCo does. Without one, enqueues the local keys.
            group: the process group for ``gather`` (default: the world).
            check_finite: raise ``ValueError`` if ``keys`` holds NaN or infinity, before
                anything is written. Off by default because it needs one host read of a flag
                (a sync on CUDA); with it off, non-finite keys are stored as they are (a NaN
                key normalizes to a NaN row, which makes the next InfoNCE losses NaN - loud,
                not silent).

        Raises:
            TypeError: ``keys`` is not a floating tensor.
            ValueError: wrong rank or width, another device, an empty batch (B = 0: an empty
                enqueue is almost always a bug upstream, so it is an error, not a no-op), or
                non-finite keys under ``check_finite``.
            RuntimeError: ``keys`` are rows of the queue's own buffer (clone them first).
            The queue is untouched when it raises.
        """
        buffers = self._buffers  # direct: enqueue is small enough for attribute lookups to show
        buffer = buffers["buffer"]
        _validate.tensor("keys", keys, ndim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have width D = {self.dim} like the queue, got shape "
                             f"{tuple(keys.shape)}")
        if keys.shape[0] == 0:
            raise ValueError("keys must hold at least one row (B >= 1), got B = 0")
        if keys.device != buffer.device:
            raise ValueError(f"keys must be on the queue's device {buffer.device}, got "
                             f"keys on {keys.device}")
        if keys.requires_grad:
            keys = keys.detach()
        if check_finite and not bool(torch.isfinite(keys).all()):
            raise ValueError("keys must be finite (check_finite=True), got NaN or infinity")
        if gather and dist.is_available() and dist.is_initialized():
            keys = gather_no_grad(keys, group)
        _ENQUEUE(buffer, buffers["ptr"], buffers["fill"], keys, self.normalize)
        if torch.compiler.is_compiling():
            self._known_fill = None
        elif self._known_fill is not None:
            self._known_fill = min(self.size, self._known_fill + keys.shape[0])

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, dtype={self.buffer.dtype}, "
                f"normalize={self.normalize}")


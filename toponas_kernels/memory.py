"""A peak-memory meter: how many bytes a block of code needs, and how many autograd keeps for
backward. The searcher, the retrainer, the memory planner and the benchmarks all measure with it.

::

    from toponas_kernels import memory_meter

    with memory_meter(params=model) as m:
        loss = criterion(model(x), y)
        loss.backward()
    m.peak_bytes    # most bytes the block held at once, above what was allocated when it began
    m.saved_bytes   # most bytes autograd held for backward at once (parameters apart)

What is measured:

* ``peak_bytes`` on a GPU: ``torch.cuda.max_memory_allocated`` during the block minus
  ``torch.cuda.memory_allocated`` when it began (the peak statistics are reset on entry, so GPU
  meters do not nest).
* ``peak_bytes`` on a CPU: the running sum of the allocation and free events that
  ``torch.profiler`` records for the CPU allocator, at its highest. This is the exact CPU
  counterpart of ``max_memory_allocated``: every byte of every ATen tensor, the same number on
  every run whatever else the process holds. It does not see memory taken outside ATen's
  allocator (numpy arrays, the Triton interpreter's buffers, Python objects), and frees of
  tensors allocated before the block do not lower the sum. The process's resident high-water
  mark (``VmHWM``, reset through ``/proc/self/clear_refs``) was the other candidate and is not
  used: it moves in pages, counts the interpreter and the allocator's cached free blocks, and
  after the first large step a second one reuses the freed heap and reads close to 0, so it is
  meaningful only once per fresh process. The profiler slows the block down (about 1.5x for a
  search step) and keeps its events until the block ends: meter a step or a few, not a whole
  run. CPU meters do not nest, nor run inside another ``torch.profiler`` session.
* ``saved_bytes``: through ``torch.autograd.graph.saved_tensors_hooks``, the most bytes of
  storage that autograd held for backward at any moment of the block, each storage counted once
  at its full size (a saved view keeps its whole storage alive; two views of one storage count
  once), whatever the device. The storages of the parameters (``params``: a module, whose
  parameters and buffers count, or an iterable of tensors; without it every leaf tensor that
  requires grad) are left out: they live anyway; ``saved_param_bytes`` reports them. A storage
  stops counting when autograd frees what it saved (after ``backward``), so a block of several
  steps reports one step's worth. Tensors saved inside ``torch.utils.checkpoint`` (or under any
  other hooks opened inside the block) are seen by those hooks, not by the meter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import torch

__all__ = ["MemoryMeter", "memory_meter", "measure_memory", "quiet_stderr"]


def _resolve(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"memory_meter: device must be a torch.device or a name such as 'cpu' or 'cuda', got {device!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"memory_meter: device {device}: no CUDA GPU is visible here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"memory_meter: device must be a CPU or a CUDA GPU, got {device}")
    return device


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level stderr (kineto prints GPU probing errors when it starts and stops on a
    machine without a GPU)."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


class _Saved:
    """What autograd keeps in place of a saved tensor while a meter counts: the tensor, and a
    count of the live saves of its storage that drops when autograd lets go of it."""

    __slots__ = ("t", "meter", "key")

    def __init__(self, t, meter, key):
        self.t, self.meter, self.key = t, meter, key

    def __del__(self):
        self.meter._release(self.key)


class MemoryMeter:
    """The meter ``memory_meter`` returns: enter it around the code to measure, then read
    ``peak_bytes``, ``saved_bytes`` and ``saved_param_bytes`` (see the module docstring). While
    the block runs on a GPU, ``current_peak_bytes()`` reads the peak so far."""

    def __init__(self, device=None, *, params=None, saved: bool = True, peak: bool = True):
        self.device = _resolve(device)
        self.count_peak = peak
        self.params = params
        self.count_saved = saved
        self.peak_bytes: int | None = None
        self.saved_bytes: int | None = None
        self.saved_param_bytes: int | None = None
        self._active = False
        self._hooks = None  # the saved-tensor hooks while a block runs

    # ---------------------------------------------------------------------- the block
    def __enter__(self) -> "MemoryMeter":
        if self._active:
            raise RuntimeError("memory_meter: this meter is already measuring a block")
        self.peak_bytes = self.saved_bytes = self.saved_param_bytes = None
        # The peak first: a refused CPU meter (one already running) must leave nothing behind,
        # above all no saved-tensor hooks, which would stay on every later forward of the process.
        if not self.count_peak:
            pass
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._start_profiler()
        self._active = True
        if self.count_saved:
            try:
                self._start_saved()
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.count_peak:
                pass
            elif self.device.type == "cuda":
                self.peak_bytes = self.current_peak_bytes()
            else:
                self.peak_bytes = self._stop_profiler()
        finally:
            self._active = False
            if self._hooks is not None:
                self._stop_saved()

    def current_peak_bytes(self) -> int:
        """GPU: the peak of the block so far (while it runs) above its start."""
        if not (self.count_peak and self._active):
            raise RuntimeError("memory_meter: the peak so far is read inside the block of a meter with peak=True")
        if self.device.type != "cuda":
            raise RuntimeError("memory_meter: the peak so far is known on a GPU only (a CPU meter knows it when its block ends)")
        torch.cuda.synchronize(self.device)
        return max(0, int(torch.cuda.max_memory_allocated(self.device)) - int(self._base))

    # ---------------------------------------------------------------------- CPU: allocator events
    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        if torch._C._autograd._profiler_enabled():
            raise RuntimeError("memory_meter: a torch.profiler session is already running (CPU meters do not nest, "
                               "nor run inside a profiler)")
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with quiet_stderr():
            self._prof.__enter__()

    def _stop_profiler(self) -> int:
        prof, self._prof = self._prof, None
        with quiet_stderr():
            prof.__exit__(None, None, None)
        events = []
        todo = list(prof.profiler.kineto_results.experimental_event_tree())
        while todo:
            node = todo.pop()
            todo.extend(node.children)
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        born: set[int] = set()  # blocks allocated inside the block, by address
        cur = peak = 0
        for _, ptr, nbytes in sorted(events, key=lambda e: e[0]):
            if nbytes > 0:
                born.add(ptr)
            elif ptr in born:
                born.discard(ptr)
            else:  # a block from before: the profiler may or may not know its size; never counted
                continue
            cur += nbytes
            peak = max(peak, cur)
        return int(peak)

    # ---------------------------------------------------------------------- bytes kept for backward
    def _start_saved(self) -> None:
        if self.params is None:
            self._own = None
        else:
            tensors = self.params
            if isinstance(tensors, torch.nn.Module):
                tensors = [*tensors.parameters(), *tensors.buffers()]
            elif isinstance(tensors, torch.Tensor):
                tensors = [tensors]
            self._own = {t.untyped_storage().data_ptr() for t in tensors}
        self._live: dict[tuple[int, bool], list[int]] = {}  # (storage address, parameter?) -> [saves alive, bytes]
        self._held = [0, 0]  # bytes held now: [activations, parameters]
        self._most = [0, 0]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()

    def _stop_saved(self) -> None:
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(None, None, None)
        self.saved_bytes, self.saved_param_bytes = int(self._most[0]), int(self._most[1])

    def _is_param(self, t: torch.Tensor, ptr: int) -> bool:
        if self._own is None:
            return t.is_leaf and t.requires_grad
        return ptr in self._own

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return t
        ptr = storage.data_ptr()
        key = (ptr, self._is_param(t, ptr))
        entry = self._live.get(key)
        if entry is None:  # a storage alive cannot share its address with another one
            self._live[key] = [1, nbytes]
            i = int(key[1])
            self._held[i] += nbytes
            self._most[i] = max(self._most[i], self._held[i])
        else:
            entry[0] += 1
        return _Saved(t, self, key)

    def _release(self, key) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self._held[int(key[1])] -= entry[1]


def _unpack(obj):
    return obj.t if isinstance(obj, _Saved) else obj


def memory_meter(device=None, *, params: torch.nn.Module | Iterable[torch.Tensor] | None = None,
                 saved: bool = True, peak: bool = True) -> MemoryMeter:
    """A context manager that measures the block it wraps: ``peak_bytes`` (the most bytes the
    block held at once above what was allocated when it began, on ``device``: default the current
    CUDA GPU when one is visible, else the CPU), ``saved_bytes`` and ``saved_param_bytes`` (the
    most bytes autograd held for backward at once, each storage once; the storages of ``params``
    apart). ``saved=False`` leaves autograd's saved tensors alone (``saved_bytes`` stays None);
    ``peak=False`` leaves the allocator alone (``peak_bytes`` stays None; on a CPU, no profiler).
    Definitions and costs: the ``toponas_kernels.memory`` module docstring."""
    return MemoryMeter(device, params=params, saved=saved, peak=peak)


def measure_memory(fn: Callable[[], object], device=None, *, params=None, saved: bool = True,
                   peak: bool = True) -> MemoryMeter:
    """``fn()`` under ``memory_meter``; its result is counted, then dropped. Returns the meter."""
    with memory_meter(device, params=params, saved=saved, peak=peak) as meter:
        fn()
    return meter

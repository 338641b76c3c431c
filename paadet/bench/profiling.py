"""Count what a piece of tensor code asks of the device: operator calls, GPU kernels and host syncs.

On a GPU, small-tensor code such as post-processing is bound by how many kernels it launches and how
often the host waits for the device (every ``.item()``, ``bool(tensor)``, ``nonzero`` or
``torch.equal`` returns data to Python and so drains the stream), more than by arithmetic. These
counts show that on any machine: :func:`count_device_work` runs a callable once under
:mod:`torch.profiler` and counts

* ``ops``: operator calls that do work (leaf ``aten::`` calls, without views and metadata-only calls);
  on a CPU this is the proxy for kernel launches;
* ``kernels``: GPU kernels actually launched (CUDA only, else None);
* ``syncs``: calls of operators that hand a device value to the host, by name (:data:`SYNC_OPS`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), int(t), float(t), bool(t), .tolist()
        "aten::nonzero",
        "aten::equal",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::masked_select",
        "aten::nonzero_static",
    }
)

NO_WORK_OPS = frozenset(
    {
        "aten::view",
        "aten::as_strided",
        "aten::expand",
        "aten::permute",
        "aten::reshape",
        "aten::_reshape_alias",
        "aten::select",
        "aten::slice",
        "aten::unsqueeze",
        "aten::squeeze",
        "aten::t",
        "aten::transpose",
        "aten::alias",
        "aten::unbind",
        "aten::empty",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::lift_fresh",
        "aten::detach",
        "aten::detach_",
        "aten::_unsafe_view",
        "aten::resolve_conj",
        "aten::resolve_neg",
        "aten::result_type",
        "aten::is_same_size",
        "aten::split",
        "aten::chunk",
        "aten::narrow",
        "aten::as_strided_",
        "aten::resize_",
        "aten::is_nonzero",
        "aten::to",
        "aten::_to_copy",
        "aten::contiguous",
        "aten::flatten",
        "aten::view_as",
        "aten::expand_as",
        "aten::squeeze_",
        "aten::unsqueeze_",
        "aten::set_",
        "aten::numpy_T",
    }
)


@dataclass
class DeviceWork:
    """What one call asked of the device (see the module docstring)."""

    ops: int
    syncs: int
    kernels: int | None
    sync_ops: dict[str, int] = field(default_factory=dict)
    top_ops: list[tuple[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "syncs": self.syncs,
            "kernels": self.kernels,
            "sync_ops": self.sync_ops,
            "top_ops": [list(t) for t in self.top_ops],
        }


def count_device_work(fn: Callable[[], Any], device: str | torch.device = "cpu") -> DeviceWork:
    """Run ``fn()`` once under the profiler and count its operator calls, host syncs and (CUDA) kernels."""
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if on_cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    leaves: Counter[str] = Counter()
    syncs: Counter[str] = Counter()
    kernels = 0
    for event in events:
        if on_cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            if not event.name.lower().startswith(("memcpy", "memset")):
                kernels += 1
            continue
        if not event.name.startswith("aten::"):
            continue
        if event.name in SYNC_OPS:
            syncs[event.name] += 1
        if event.name in NO_WORK_OPS or any(child.name.startswith("aten::") for child in event.cpu_children):
            continue
        leaves[event.name] += 1
    return DeviceWork(
        ops=sum(leaves.values()),
        syncs=sum(syncs.values()),
        kernels=kernels if on_cuda else None,
        sync_ops=dict(syncs),
        top_ops=leaves.most_common(8),
    )

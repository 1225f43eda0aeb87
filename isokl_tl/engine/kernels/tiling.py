"""The tiles a Triton multiply runs with: the nearest entry of its measured table, with as many
pipeline stages as the device's shared memory holds (`splitk.tiles`, `gate_up.tiles`)."""

import functools

import torch


def nearest(table: dict, rows: int, width: int):
    """`table`'s entry (keyed by (rows <= 64, width)) for `rows` x `width`: that of the nearest
    width among the entries of its row class."""
    small = rows <= 64
    return table[min((k for k in table if k[0] == small), key=lambda k: abs(k[1] - width))]


def fit_stages(stages: int, per_stage: int, device: torch.device | None) -> int | None:
    """At most `stages` pipeline stages of `per_stage` bytes each (the tiles one stage loads: an
    upper bound of what the pipelined loads hold), fewer where the device's shared memory could
    not hold them (float32, or a GPU with less of it than an H200); None where even two would not."""
    room = shared_memory(device)
    while stages > 2 and stages * per_stage > room:
        stages -= 1
    return stages if stages * per_stage <= room else None


@functools.cache
def _shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def shared_memory(device: torch.device | None) -> int:
    """Bytes of shared memory a kernel may use on `device` (no limit off CUDA: the interpreter)."""
    if device is None or device.type != "cuda":
        return 1 << 40
    return _shared_memory(device.index if device.index is not None else torch.cuda.current_device())

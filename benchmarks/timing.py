"""Timing a piece of GPU work the way the decode step runs it: captured once in a CUDA graph, then
replayed (`graph_us`). Shared by the tuning and probing scripts."""

import statistics
import time

import torch


def graph_us(fn, calls: int = 1, reps: int = 20, rounds: int = 5) -> float:
    """Microseconds per call: `fn` (which makes `calls` calls of the thing timed) is run once,
    captured in a CUDA graph, and the graph replayed `reps` times per round; median of the rounds."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
        times.append(1e6 * (time.perf_counter() - start) / reps / calls)
    return statistics.median(times)

"""CUDA-graph replay of the per-scale transformer steps.

At batch 1 a next-scale transformer spends most of its time launching thousands of small kernels.
:class:`CUDAGraphScaleSteps` records one CUDA graph per scale for a fixed batch (KV cache storage, inputs
and outputs at static addresses) and replays it, so a whole scale costs one launch. Everything around the
transformer (guidance, filtering, sampling, the tokenizer's f_hat update) stays eager and runs on the GPU.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class CUDAGraphScaleSteps:
    """One CUDA graph per scale for ``step(scale_index, *inputs) -> logits`` with fixed input shapes.

    Args:
        step: the eager per-scale function; it must read the KV cache that ``reset_cache`` rewinds.
        example_inputs: per scale, a tuple of example tensors (shapes and dtypes of the real inputs;
            ``None`` for an absent input).
        reset_cache: rewinds the KV cache to empty without freeing its storage.
    """

    def __init__(self, step: Callable, example_inputs: Sequence[tuple], reset_cache: Callable[[], None]):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device.")
        self.static_inputs = [tuple(None if t is None else t.clone() for t in inputs) for inputs in example_inputs]
        self.graphs, self.outputs = [], []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # warm-up: allocator, cuBLAS / SDPA workspaces
            for _ in range(2):
                reset_cache()
                for si, inputs in enumerate(self.static_inputs):
                    step(si, *inputs)
        torch.cuda.current_stream().wait_stream(side)
        reset_cache()
        pool = None
        with torch.no_grad():
            for si, inputs in enumerate(self.static_inputs):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = step(si, *inputs)
                pool = graph.pool()
                self.graphs.append(graph)
                self.outputs.append(out)
        reset_cache()

    def __call__(self, scale_index: int, *inputs: torch.Tensor | None) -> torch.Tensor:
        for static, value in zip(self.static_inputs[scale_index], inputs):
            if static is not None:
                static.copy_(value, non_blocking=True)
        self.graphs[scale_index].replay()
        return self.outputs[scale_index]

"""CUDA graphs of a whole training step (forward, backward, optimizer steps), one per step signature, replayed
with the step's inputs copied into the graph's own. A step bound by the host's time to issue its kernels (small
batches, many adapters: `surgery.jobs`) then costs about its GPU time.

A signature's first `warmup` steps run eagerly on a side stream (optimizer state, kernel tuning and cached tensors
are made there, outside any graph); the next one is captured and replayed. A capture that fails (the step waits
for the device, or reads a value to the host) leaves nothing changed: that signature runs eagerly from then on,
with a warning."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

Step = Callable[[tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], outputs: dict, held: object):
        # held: what the step made before its capture and read inside it (e.g. a routing's group index), which the
        # graph reads by address at every replay and so must outlive it
        self.graph, self.inputs, self.outputs, self.held = graph, inputs, outputs, held


class StepGraphs:
    """Graphs of one step function by signature: at most `keep` kept (least recently used dropped); signatures
    seen `warmup` times or fewer run eagerly. The graphs share one memory pool, so they hold about the largest
    step's memory, not the sum: everything a step makes in the pool is scratch but its outputs, which a replay
    copies out at once, and the graphs replay one at a time on one stream."""

    def __init__(self, warmup: int = 2, keep: int = 8):
        self.warmup, self.keep = warmup, keep
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._seen: dict[Hashable, int] = {}
        self._eager: dict[Hashable, str] = {}  # signatures whose capture failed, and why
        self._warned = False
        self._pool = None

    def run(self, signature: Hashable, inputs: tuple[torch.Tensor, ...], step: Step,
            grads: Callable[[], Sequence[torch.Tensor]], held: Callable[[], object]) -> dict[str, torch.Tensor]:
        """`step(inputs)` for this `signature`: eagerly, or by replaying its graph with `inputs` copied in. The
        returned tensors are the step's own (a replay's are copies). `grads()` gives the parameters whose `.grad`
        the step sets and leaves None: they are None again after a capture, whose gradients live in the graph.
        `held()`, called after a capture, gives what the graph reads but did not make (kept with it)."""
        captured = self._graphs.get(signature)
        if captured is None:
            if signature in self._eager:
                return step(inputs)
            seen = self._seen[signature] = self._seen.get(signature, 0) + 1
            if len(self._seen) > 64:  # a signature that keeps changing (a float lr on a schedule): never captured
                self._too_many()
                self._seen = {signature: seen}
            if seen <= self.warmup:
                return _on_side_stream(step, inputs)
            captured = self._capture(signature, inputs, step, grads, held)
            if captured is None:
                return step(inputs)
        self._graphs.move_to_end(signature)
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.graph.replay()
        return {name: value.clone() for name, value in captured.outputs.items()}

    def _capture(self, signature: Hashable, inputs: tuple[torch.Tensor, ...], step: Step,
                 grads: Callable[[], Sequence[torch.Tensor]], held: Callable[[], object]) -> _Captured | None:
        static = tuple(x.clone() for x in inputs)
        params = list(grads())
        for p in params:
            p.grad = None  # made inside the capture, from the graph's memory
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = step(static)
        except Exception as error:  # noqa: BLE001 -- nothing ran: a capture records kernels, runs none
            for p in params:
                p.grad = None
            self._eager[signature] = f"{type(error).__name__}: {error}"
            warnings.warn(f"cuda_graph: this step could not be captured, so it runs eagerly ({self._eager[signature]})",
                          RuntimeWarning, stacklevel=4)
            return None
        for p in params:
            p.grad = None  # the graph writes its gradients into its own memory; outside it they stay None
        captured = self._graphs[signature] = _Captured(graph, static, outputs, held())
        self._seen.pop(signature, None)
        while len(self._graphs) > self.keep:
            self._graphs.popitem(last=False)
        return captured

    def _too_many(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn("cuda_graph: the step's signature keeps changing, so steps run eagerly: batch shapes "
                          "(pad to a few fixed lengths) or an optimizer's float hyperparameters (a scheduled lr: "
                          "give the optimizer lr as a tensor on the device)", RuntimeWarning, stacklevel=4)


def _on_side_stream(step: Step, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """`step(inputs)` on a side stream, ordered after and before the current stream's work (how a capture's
    warm-up runs)."""
    main = torch.cuda.current_stream(inputs[0].device)
    side = torch.cuda.Stream(inputs[0].device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        outputs = step(inputs)
    main.wait_stream(side)
    for value in outputs.values():
        value.record_stream(main)  # made on the side stream, read on the main one
    return outputs

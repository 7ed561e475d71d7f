"""CUDA graphs of a whole training step (forward, backward, optimizer steps), one per step signature, replayed
with the step's inputs copied into the graph's own. A step bound by the host's time to issue its kernels (small
batches, many adapters: `surgery.jobs`) then costs about its GPU time.

A signature's first `warmup` steps run eagerly on a side stream (optimizer state, kernel tuning and cached tensors
are made there, outside any graph); the next one is captured and replayed. A capture that fails (the step waits
for the device, or reads a value to the host) leaves nothing changed: that signature runs eagerly from then on,
with a warning.

A graph is kept only where it pays. The last warm-up step and the first `TIMED` replays are timed on the device
(CUDA events, read once they have completed, never waited for); a graph whose replays take longer than the eager
step is dropped, and its signature runs eagerly from then on (`eager` says why). Where the GPU bounds a step, its
graph can be the slower (docs/performance.md: cuDNN's attention backward inside a graph)."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

Step = Callable[[tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]


TIMED = 3  # replays timed against the eager step before a graph is kept for good

Timing = tuple[torch.cuda.Event, torch.cuda.Event]


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor, ...], outputs: dict, held: object,
                 eager: Timing | None):
        # held: what the step made before its capture and read inside it (e.g. a routing's group index), which the
        # graph reads by address at every replay and so must outlive it
        self.graph, self.inputs, self.outputs, self.held = graph, inputs, outputs, held
        self.eager = eager  # the last warm-up step's events; None once the graph is kept for good
        self.replays: list[Timing] = []


def _events() -> Timing:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _median_ms(timings: list[Timing]) -> float:
    return sorted(start.elapsed_time(end) for start, end in timings)[len(timings) // 2]


class StepGraphs:
    """Graphs of one step function by signature: at most `keep` kept (least recently used dropped); signatures
    seen `warmup` times or fewer run eagerly. The graphs share one memory pool, so they hold about the largest
    step's memory, not the sum: everything a step makes in the pool is scratch but its outputs, which a replay
    copies out at once, and the graphs replay one at a time on one stream."""

    def __init__(self, warmup: int = 2, keep: int = 8):
        self.warmup, self.keep = warmup, keep
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._seen: dict[Hashable, int] = {}
        self._eager: dict[Hashable, str] = {}  # signatures run eagerly (their capture failed, or lost), and why
        self._timed: dict[Hashable, Timing] = {}  # the last warm-up step's events, until its capture
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
                if seen < self.warmup:
                    return _on_side_stream(step, inputs)
                self._timed[signature] = _events()
                return _on_side_stream(step, inputs, self._timed[signature])
            captured = self._capture(signature, inputs, step, grads, held)
            if captured is None:
                return step(inputs)
        elif captured.eager is not None and not self._keeps(signature, captured):
            return step(inputs)
        self._graphs.move_to_end(signature)
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        if captured.eager is not None and len(captured.replays) < TIMED:
            start, end = _events()
            start.record()
            captured.graph.replay()
            end.record()
            captured.replays.append((start, end))
        else:
            captured.graph.replay()
        return {name: value.clone() for name, value in captured.outputs.items()}

    @property
    def eager(self) -> dict[Hashable, str]:
        """The signatures that run eagerly, and why: their capture failed, or their graph was slower."""
        return dict(self._eager)

    def _keeps(self, signature: Hashable, captured: _Captured) -> bool:
        """Whether the graph of `signature` stays, once its timed replays and the eager step have completed (until
        then, and after it is kept for good, True); a graph slower than the eager step is dropped."""
        if len(captured.replays) < TIMED or not captured.replays[-1][1].query() or not captured.eager[1].query():
            return True
        eager, graphed = captured.eager[0].elapsed_time(captured.eager[1]), _median_ms(captured.replays)
        captured.eager, captured.replays = None, []
        if graphed <= eager:
            return True
        del self._graphs[signature]
        self._eager[signature] = f"its graph was slower than the eager step ({graphed:.2f} ms against {eager:.2f})"
        return False

    def _capture(self, signature: Hashable, inputs: tuple[torch.Tensor, ...], step: Step,
                 grads: Callable[[], Sequence[torch.Tensor]], held: Callable[[], object]) -> _Captured | None:
        eager = self._timed.pop(signature, None)
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
        captured = self._graphs[signature] = _Captured(graph, static, outputs, held(), eager)
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


def _on_side_stream(step: Step, inputs: tuple[torch.Tensor, ...], timing: Timing | None = None
                    ) -> dict[str, torch.Tensor]:
    """`step(inputs)` on a side stream, ordered after and before the current stream's work (how a capture's
    warm-up runs); `timing`'s events recorded around it there."""
    main = torch.cuda.current_stream(inputs[0].device)
    side = torch.cuda.Stream(inputs[0].device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        if timing is not None:
            timing[0].record()
        outputs = step(inputs)
        if timing is not None:
            timing[1].record()
    main.wait_stream(side)
    for value in outputs.values():
        value.record_stream(main)  # made on the side stream, read on the main one
    return outputs

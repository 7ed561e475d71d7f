"""Several training jobs on one frozen base, as mLoRA runs them: each job is an attachment with its own data and
optimizer; one step stacks the jobs' batches, routes each sample to its job's attachment (`per_sample`), runs one
forward and one backward, and steps every job's optimizer. Each job's loss is computed over its own rows only, as
if it trained alone, and the attachments share no parameter, so each job's gradients are those of training it
alone on its batch (to float rounding)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from operator import itemgetter

import torch
from torch import nn

from surgery.engine.host import Host
from surgery.engine.ledger import Ledger, require_ledger, unwrap
from surgery.engine.passes import per_sample
from surgery.engine.step_graphs import StepGraphs
from surgery.errors import SurgeryError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over labels that are not -100 (what transformers' causal LMs return). The
    labels are shifted, not the logits, as transformers does: a slice of the logits would cost its backward a
    zero-filled copy of their gradient."""
    shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


class Jobs:
    """Jobs `optimizers` (attachment name -> its optimizer) on `model`. `step(batches)` takes each job's batch
    (`input_ids`, optional `attention_mask` and `labels`; lengths may differ: shorter ones are right-padded and
    masked) and returns each job's loss, a detached 0-dim tensor: reading it (`float(loss)`) waits for the device,
    so a loop that reads the losses every few steps lets the next step's kernels queue meanwhile. `loss(logits,
    labels)` defaults to the causal LM loss.

    `cuda_graph=True` replays each step as one CUDA graph (surgery/engine/step_graphs.py), for steps bound by the
    host's time to issue kernels (small batches). One graph per step signature (the jobs' names, batch shapes,
    masks; the model's and the optimizers' settings), made on the signature's third step; the first two run
    eagerly. Needs batches on a CUDA device, optimizers made with `capturable=True`, float hyperparameters that stay
    put (a scheduled lr goes in as a tensor on the device), and a model and loss that never wait for the device. A
    graph slower than the eager step over its first replays is dropped (`graphs.eager` says which, and why)."""

    def __init__(self, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                 loss: LossFn = causal_lm_loss, pad_token_id: int | None = None, cuda_graph: bool = False):
        ledger = require_ledger(unwrap(model))
        if not optimizers:
            raise SurgeryError("jobs: no job given (a mapping of attachment name -> optimizer)")
        for name in optimizers:
            ledger.get(name)  # an unknown name raises, naming it
        if cuda_graph:
            for name, optimizer in optimizers.items():
                for i, group in enumerate(optimizer.param_groups):
                    if group.get("capturable", True) is False:
                        raise SurgeryError(f"jobs(cuda_graph=True): job {name!r}: param group {i} of its "
                                           f"{type(optimizer).__name__} is not capturable; make it with "
                                           f"capturable=True")
        self.model, self.optimizers, self.loss = model, dict(optimizers), loss
        self.graphs = StepGraphs() if cuda_graph else None
        config = getattr(unwrap(model), "config", None)
        self.pad = pad_token_id if pad_token_id is not None else (getattr(config, "pad_token_id", None) or 0)

    def step(self, batches: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One joint forward, backward and optimizer step of every job in `batches` (a subset of the jobs)."""
        unknown = sorted(set(batches) - set(self.optimizers))
        if unknown:
            raise SurgeryError(f"jobs: batches for {unknown}, which are not jobs here: {sorted(self.optimizers)}")
        names, ids, masks, labels, rows = [], [], [], [], {}
        width = max(b["input_ids"].shape[1] for b in batches.values())
        for name, batch in batches.items():
            x = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(x))
            lab = batch.get("labels", x.masked_fill(mask == 0, -100))
            pad = width - x.shape[1]
            ids.append(nn.functional.pad(x, (0, pad), value=self.pad))
            masks.append(nn.functional.pad(mask, (0, pad), value=0))
            labels.append(nn.functional.pad(lab, (0, pad), value=-100))
            rows[name] = slice(len(names), len(names) + x.shape[0])
            names += [name] * x.shape[0]
        # no mask where none was given and nothing was padded: the model's own causal attention, as for one job
        masked = any("attention_mask" in b or b["input_ids"].shape[1] < width for b in batches.values())
        inputs = (torch.cat(ids), torch.cat(labels)) + ((torch.cat(masks),) if masked else ())

        def run(tensors: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
            return self._run(names, rows, *tensors)
        if self.graphs is None:
            return run(inputs)
        if inputs[0].device.type != "cuda":
            raise SurgeryError(f"jobs(cuda_graph=True): the batches are on {inputs[0].device}; CUDA graphs need "
                               f"them on a CUDA device")
        ledger = require_ledger(unwrap(self.model))

        def held() -> tuple:  # the routings' group indices the graph reads; what the signature names by id()
            return ([host.routing_state() for host in ledger.hosts.values() if isinstance(host, Host)],
                    list(ledger.attachments.values()), self._parameters(batches), self.loss)
        return self.graphs.run(self._signature(names, rows, inputs, ledger), inputs, run,
                               lambda: self._parameters(batches), held)

    def _run(self, names: list[str], rows: dict[str, slice], ids: torch.Tensor, labels: torch.Tensor,
             mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with per_sample(self.model, names):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # one split, not a slice per job: in backward the jobs' logit gradients are concatenated once, where each
        # slice's would be a zero-filled full-size gradient, added up (rows: consecutive, in order)
        parts = logits.split([r.stop - r.start for r in rows.values()])
        losses = {name: self.loss(part, labels[r]) for (name, r), part in zip(rows.items(), parts)}
        torch.stack(list(losses.values())).sum().backward()
        for name in rows:
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
        return {name: loss.detach() for name, loss in losses.items()}  # no wait for the device here

    def _parameters(self, batches: Mapping) -> list[torch.Tensor]:
        return [p for name in batches for group in self.optimizers[name].param_groups for p in group["params"]]

    def _signature(self, names: list[str], rows: Mapping[str, slice], inputs: tuple[torch.Tensor, ...],
                   ledger: Ledger) -> tuple:
        """What a captured step depends on beyond its input values: a change in any of it is another graph."""
        attached = tuple((n, id(a), a.merged is None) for n, a in ledger.attachments.items())
        settings = tuple((name, id(self.optimizers[name]), _settings(self.optimizers[name])) for name in rows)
        return (tuple(names), tuple((x.shape, x.dtype, x.device) for x in inputs), unwrap(self.model).training,
                ledger.disabled, tuple(ledger.active), attached, settings, id(self.loss))


def _settings(optimizer: torch.optim.Optimizer) -> tuple:
    """Each param group's parameters (by id) and its settings but tensors: a captured step reads those by value."""
    return tuple((tuple(map(id, group["params"])),
                  tuple((k, _hashable(v)) for k, v in sorted(group.items(), key=_first)
                        if k != "params" and not isinstance(v, torch.Tensor)))
                 for group in optimizer.param_groups)


_first = itemgetter(0)


def _hashable(value: object) -> object:
    """`value`, or its repr where it cannot be hashed (a list among an optimizer's settings)."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def jobs(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], loss: LossFn = causal_lm_loss,
         pad_token_id: int | None = None, cuda_graph: bool = False) -> Jobs:
    """Several adapters trained at once on one base, each with its own data and optimizer (see `Jobs`)."""
    return Jobs(model, optimizers, loss, pad_token_id, cuda_graph)

"""Several training jobs on one frozen base, as mLoRA runs them: each job is an attachment with its own data and
optimizer; one step stacks the jobs' batches, routes each sample to its job's attachment (`per_sample`), runs one
forward and one backward, and steps every job's optimizer. Each job's loss is computed over its own rows only, as
if it trained alone, and the attachments share no parameter, so each job's gradients are those of training it
alone on its batch (to float rounding)."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from surgery.engine.ledger import require_ledger, unwrap
from surgery.engine.passes import per_sample
from surgery.errors import SurgeryError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over labels that are not -100 (what transformers' causal LMs return)."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)


class Jobs:
    """Jobs `optimizers` (attachment name -> its optimizer) on `model`. `step(batches)` takes each job's batch
    (`input_ids`, optional `attention_mask` and `labels`; lengths may differ: shorter ones are right-padded and
    masked) and returns each job's loss, a detached 0-dim tensor: reading it (`float(loss)`) waits for the device,
    so a loop that reads the losses every few steps lets the next step's kernels queue meanwhile. `loss(logits,
    labels)` defaults to the causal LM loss."""

    def __init__(self, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
                 loss: LossFn = causal_lm_loss, pad_token_id: int | None = None):
        ledger = require_ledger(unwrap(model))
        if not optimizers:
            raise SurgeryError("jobs: no job given (a mapping of attachment name -> optimizer)")
        for name in optimizers:
            ledger.get(name)  # an unknown name raises, naming it
        self.model, self.optimizers, self.loss = model, dict(optimizers), loss
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
        labels_all = torch.cat(labels)
        # no mask where none was given and nothing was padded: the model's own causal attention, as for one job
        masked = any("attention_mask" in b or b["input_ids"].shape[1] < width for b in batches.values())
        with per_sample(self.model, names):
            logits = self.model(input_ids=torch.cat(ids), attention_mask=torch.cat(masks) if masked else None,
                                use_cache=False).logits
        losses = {name: self.loss(logits[r], labels_all[r]) for name, r in rows.items()}
        torch.stack(list(losses.values())).sum().backward()
        for name in batches:
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
        return {name: loss.detach() for name, loss in losses.items()}  # no wait for the device here


def jobs(model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], loss: LossFn = causal_lm_loss,
         pad_token_id: int | None = None) -> Jobs:
    """Several adapters trained at once on one base, each with its own data and optimizer (see `Jobs`)."""
    return Jobs(model, optimizers, loss, pad_token_id)

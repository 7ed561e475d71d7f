"""Which linears of no user input are sites: projections of learned tokens (a parameter table, as BLIP-2's Q-Former
queries) are, with their attention roles; linears computing a table from buffers or constants are not
(`surgery.analysis.dataflow.learned_tokens`)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.analysis.facts import analyze

Q, K, V, O = "attention.query", "attention.key", "attention.value", "attention.output"
TOKENS = (torch.arange(16).reshape(2, 8) % 32,)


pytestmark = pytest.mark.usefixtures("fresh_analysis_cache")


class QueryAttention(nn.Module):
    """Self-attention over learned query tokens (through a layer norm and dropout, as BLIP-2's Q-Former layer 0),
    then cross-attention from them to the user's tokens."""

    def __init__(self, eager: bool):
        super().__init__()
        self.eager = eager
        self.embed = nn.Embedding(32, 16)
        self.query_tokens = nn.Parameter(torch.randn(1, 4, 16))
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.cq, self.ck, self.cv, self.co = (nn.Linear(16, 16) for _ in range(4))

    def attend(self, q, k, v):
        b = q.shape[0]
        q, k, v = (t.view(b, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
        if self.eager:
            out = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, -1, 16)

    def forward(self, ids):
        text = self.embed(ids)
        queries = self.drop(self.norm(self.query_tokens.expand(ids.shape[0], -1, -1)))
        h = queries + self.o(self.attend(self.q(queries), self.k(queries), self.v(queries)))
        return h + self.co(self.attend(self.cq(h), self.ck(text), self.cv(text)))


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_projections_of_learned_query_tokens_are_attention_sites(eager):
    facts = analyze(QueryAttention(eager).eval(), TOKENS)
    assert {p: facts.roles.get(p) for p in ("q", "k", "v", "o", "cq", "ck", "cv", "co")} == {
        "q": {Q}, "k": {K}, "v": {V}, "o": {O}, "cq": {Q}, "ck": {K}, "cv": {V}, "co": {O}}
    assert facts.linears["q"].in_features == 16 and facts.attention[""].cross is False


class ConstantTables(nn.Module):
    """Linears whose input is computed from buffers or constants only: none is a site. `bias_mlp` is Swin v2's
    continuous position bias (Linear -> ReLU -> Linear on a coordinate table), `normed` reads a layer-normed
    buffer, `scaled` a buffer times a learned gain (a hand-written RMSNorm's weight), `grid` a constant; `proj`
    reads the user's tokens and is the one site."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.register_buffer("coords", torch.randn(8, 2))
        self.register_buffer("table", torch.randn(8, 16))
        self.bias_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)
        self.normed = nn.Linear(16, 16)
        self.gain = nn.Parameter(torch.ones(16))
        self.scaled = nn.Linear(16, 16)
        self.grid = nn.Linear(16, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, ids):
        bias = self.bias_mlp(self.coords) + self.normed(self.norm(self.table)) + self.scaled(self.gain * self.table)
        bias = bias + self.grid(torch.linspace(0, 1, 16, device=ids.device).expand(8, 16))
        return self.proj(self.embed(ids)) + bias


def test_linears_of_buffers_and_constants_are_not_sites():
    facts = analyze(ConstantTables().eval(), TOKENS)
    assert set(facts.linears) == {"proj"}


class LearnedTable(nn.Module):
    """A learned table (an nn.Embedding read at constant ids, DETR's query embeddings) through a projection: the
    table is data, so both of the projections reading it are sites, as are projections of one learned token and of
    a learned vector expanded over positions (Inkling 2's attention residuals)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.queries = nn.Embedding(4, 16)
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)
        self.token = nn.Parameter(torch.randn(1, 1, 16))
        self.single = nn.Linear(16, 16)
        self.vector = nn.Parameter(torch.randn(16))
        self.expanded = nn.Linear(16, 16)

    def forward(self, ids):
        table = self.second(torch.relu(self.first(self.queries(torch.arange(4, device=ids.device)))))
        vector = self.expanded(self.vector.view(1, 16).expand(ids.shape[1], 16))
        return self.embed(ids) + table.mean(0) + self.single(self.token) + vector


def test_projections_of_learned_tables_are_sites():
    facts = analyze(LearnedTable().eval(), TOKENS)
    assert set(facts.linears) == {"first", "second", "single", "expanded"}

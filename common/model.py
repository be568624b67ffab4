"""The credit model: a shared encoder (federated) and a small head (private to each bank).

No BatchNorm anywhere: its statistics mix examples, which DP-SGD's per-example
clipping cannot account for. LayerNorm normalises each example on its own.
"""

import torch
from torch import nn

from fedfin.common.config import ModelConfig
from fedfin.common.schema import FeatureSchema


def embedding_dim(cardinality: int, max_dim: int) -> int:
    """A common rule of thumb: grow slowly with the number of categories."""
    return max(2, min(max_dim, round(1.6 * cardinality**0.56)))


class Encoder(nn.Module):
    """Embeddings for categoricals, concatenated with numerics, then an MLP with LayerNorm."""

    def __init__(self, schema: FeatureSchema, config: ModelConfig) -> None:
        super().__init__()
        dims = [embedding_dim(c.cardinality, config.max_embedding_dim) for c in schema.categorical]
        self.embeddings = nn.ModuleList(
            nn.Embedding(c.cardinality, dim)
            for c, dim in zip(schema.categorical, dims, strict=True)
        )
        width = len(schema.numeric) + sum(dims)
        layers: list[nn.Module] = []
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [numeric] + [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat(parts, dim=1))


class Head(nn.Module):
    """Maps the representation to a default logit; logistic when `hidden == 0`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        rep = config.representation_dim
        if config.head_hidden:
            self.layers: nn.Module = nn.Sequential(
                nn.Linear(rep, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1)
            )
        else:
            self.layers = nn.Linear(rep, 1)

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        return self.layers(representation).squeeze(-1)


class CreditModel(nn.Module):
    """Encoder + head; `forward` returns the logit of default for each row."""

    def __init__(self, schema: FeatureSchema, config: ModelConfig) -> None:
        super().__init__()
        self.encoder = Encoder(schema, config)
        self.head = Head(config)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(numeric, categorical))


def build_model(schema: FeatureSchema, config: ModelConfig, seed: int) -> CreditModel:
    """A freshly initialised model; the seed makes initialisation reproducible."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CreditModel(schema, config)
    finally:
        torch.random.set_rng_state(generator_state)

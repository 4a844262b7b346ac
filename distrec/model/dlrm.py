"""DLRM: bottom MLP over dense features, pooled embeddings, dot / cat / DCN-v2 interaction, top MLP,
optionally DeepFM's factorization machine added to the logit.

    model = DLRM.from_config(cfg, ShardedEmbeddingCollection(tables, plan, rank=0))
    logits = model(batch.dense, batch.sparse)       # [batch]

With no dense features the bottom MLP is absent and only the embeddings interact. With ``overlap`` (the
default) and an embedding part that can leave its exchange in flight (``start_forward``: the sharded
runtime), the bottom MLP runs while the pooled embeddings are exchanged, and its backward while their
gradients are. Every option off
(dropout 0, norm "none", fm False, init "default") builds exactly the modules, in the same order, that
the model had before they existed: the same parameters for a seed and the same state_dict keys.
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.config import Config, dropout_rates
from distrec.model.embedding import EmbeddingPart
from sharding.jagged import JaggedBatch


NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
LINEAR_INITS = {"xavier_uniform": nn.init.xavier_uniform_, "xavier_normal": nn.init.xavier_normal_}


def mlp(sizes: list[int], relu_last: bool, norm: str = "none", dropout: list[float] | None = None) -> nn.Sequential:
    """Hidden layers Linear -> norm -> ReLU -> Dropout (``dropout[i]`` for hidden layer i; none at 0).

        mlp([13, 64, 16], relu_last=True, norm="batch", dropout=[0.1, 0.0])

    The norm sits before the ReLU, as in the batch-norm paper and BARS' MLP blocks: it centres the
    pre-activation so the ReLU keeps about half the units whatever the layer's bias drifts to."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or relu_last:
            if norm != "none":
                layers.append(NORMS[norm](sizes[i + 1]))
            layers.append(nn.ReLU())
            if dropout and dropout[i] > 0:
                layers.append(nn.Dropout(dropout[i]))
    return nn.Sequential(*layers)


def init_linears_(module: nn.Module, init: str) -> None:
    """``init`` ("default": leave torch's) on every Linear's weight in ``module``, biases zeroed."""
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            LINEAR_INITS[init](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DotInteraction(nn.Module):
    """Pairwise dot products of the F feature vectors (i > j), after the dense vector if any."""

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.tril_indices(num_features, num_features, offset=-1)
        # One flat index: index_select (and its index_add backward) is much faster than z[:, rows, cols].
        self.register_buffer("pairs", rows * num_features + cols, persistent=False)

    @staticmethod
    def out_size(num_features: int, dense_size: int) -> int:
        return num_features * (num_features - 1) // 2 + dense_size

    def forward(self, dense: torch.Tensor | None, pooled: torch.Tensor, dim: int) -> torch.Tensor:
        feats = pooled.view(pooled.shape[0], pooled.shape[1] // dim, dim)  # -1 fails on 0 rows
        if dense is not None:
            feats = torch.cat([dense.unsqueeze(1), feats], dim=1)
        z = torch.bmm(feats, feats.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return z if dense is None else torch.cat([dense, z], dim=1)


class CatInteraction(nn.Module):
    """The dense vector (if any) and every pooled embedding side by side: the top MLP sees them all."""

    def forward(self, dense: torch.Tensor | None, pooled: torch.Tensor, dim: int) -> torch.Tensor:
        return pooled if dense is None else torch.cat([dense, pooled], dim=1)


class FactorizationMachine(nn.Module):
    """DeepFM's FM over the F pooled vectors v_f (one dim): a first-order term w . concat(v_f) (one
    weight per embedding coordinate; no bias, the top MLP has one) plus the pairwise interactions
    sum_{f<g} <v_f, v_g> = 0.5 * sum_d((sum_f v_f)^2 - sum_f v_f^2), per sample.

        fm = FactorizationMachine(3 * 8); fm(pooled, 8)       # [batch]

    The sharded runtime hands the model pooled vectors only, so the first-order term is over them, not a
    scalar weight per id (which would need a second, 1-wide table per feature)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 1, bias=False)

    def forward(self, pooled: torch.Tensor, dim: int) -> torch.Tensor:
        v = pooled.view(pooled.shape[0], pooled.shape[1] // dim, dim)
        total = v.sum(1)
        pairs = 0.5 * (total * total - (v * v).sum(1)).sum(1)
        return self.linear(pooled).squeeze(1) + pairs


class CrossInteraction(nn.Module):
    """DCN-v2: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l; W_l = U_l V_l when low_rank > 0."""

    def __init__(self, width: int, layers: int, low_rank: int):
        super().__init__()

        def weight() -> nn.Module:
            if low_rank:
                return nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))
            return nn.Linear(width, width)

        self.layers = nn.ModuleList(weight() for _ in range(layers))

    def forward(self, dense: torch.Tensor | None, pooled: torch.Tensor, dim: int) -> torch.Tensor:
        x0 = pooled if dense is None else torch.cat([dense, pooled], dim=1)
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DLRM(nn.Module):
    """``dropout``: a rate, or one per hidden layer (the bottom MLP's, when there are dense features,
    then the top's); see ``mlp`` for ``norm`` and ``init_linears_`` for ``init``.

        DLRM(13, embeddings, [64, 16], [64, 32], "cat", dropout=0.1, norm="layer", fm=True)

    ``overlap``: run the bottom MLP while the pooled embeddings are exchanged (same results either way).
    ``precision="bf16"`` or ``"fp16"``: the bottom MLP, the interaction, the top MLP (and FM) under that
    autocast; the pooled embeddings come in fp32, and the logit is returned in fp32 for an fp32 loss (fp16
    needs the trainer's loss scaling: ``distrec.trainer.loss_scale``). ``eval_precision = "fp32"``: in
    eval() the dense part runs in fp32 whatever ``precision`` is (config ``eval.precision``).
    """

    def __init__(self, num_dense: int, embeddings: EmbeddingPart, bottom_mlp: list[int], top_mlp: list[int],
                 interaction: str = "dot", dcn_layers: int = 2, dcn_low_rank: int = 0,
                 dropout: float | list[float] = 0.0, norm: str = "none", fm: bool = False, init: str = "default",
                 overlap: bool = True, precision: str = "fp32", eval_precision: str = "train"):
        super().__init__()
        self.embeddings = embeddings
        self.overlap, self.precision, self.eval_precision = overlap, precision, eval_precision
        n_bottom = len(bottom_mlp) if num_dense else 0
        rates = list(dropout) if isinstance(dropout, list) else [dropout] * (n_bottom + len(top_mlp))
        self.bottom = mlp([num_dense, *bottom_mlp], True, norm, rates[:n_bottom]) if num_dense else None
        dense_size = bottom_mlp[-1] if num_dense else 0
        self.dim = embeddings.dims[0]
        if interaction == "dot":
            self.interaction = DotInteraction(len(embeddings.dims) + (1 if num_dense else 0))
            top_in = DotInteraction.out_size(len(embeddings.dims) + (1 if num_dense else 0), dense_size)
        else:
            top_in = dense_size + sum(embeddings.dims)
            self.interaction = CatInteraction() if interaction == "cat" else \
                CrossInteraction(top_in, dcn_layers, dcn_low_rank)
        self.top = mlp([top_in, *top_mlp, 1], False, norm, rates[n_bottom:])
        # Made last, so the other layers draw the same initial values with or without it.
        self.fm = FactorizationMachine(sum(embeddings.dims)) if fm else None
        for part in (self.bottom, self.interaction, self.top, self.fm):
            if part is not None:
                init_linears_(part, init)

    @staticmethod
    def from_config(cfg: Config, embeddings: EmbeddingPart) -> "DLRM":
        m = cfg.model
        return DLRM(len(cfg.schema.dense), embeddings, m.bottom_mlp, m.top_mlp, m.interaction,
                    m.dcn_layers, m.dcn_low_rank, dropout_rates(cfg), m.norm, m.fm, m.init, cfg.train.overlap,
                    cfg.train.precision, cfg.eval.precision)

    def _bottom(self, dense: torch.Tensor) -> torch.Tensor | None:
        if self.bottom is None:
            return None
        with torch.profiler.record_function("bottom_mlp"), self._compute(dense):
            return self.bottom(dense)

    def _compute(self, like: torch.Tensor) -> torch.autocast:
        """The dense part's precision: bf16 or fp16 autocast on ``like``'s device, or fp32 (autocast off)."""
        precision = self.active_precision
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(like.device.type, dtype=dtype, enabled=precision != "fp32")

    @property
    def active_precision(self) -> str:
        """The precision of this forward: training's, also in eval() unless eval_precision = "fp32"."""
        return self.precision if self.training or self.eval_precision == "train" else "fp32"

    def dense_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.embeddings.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def forward(self, dense: torch.Tensor, sparse: JaggedBatch) -> torch.Tensor:
        start = getattr(self.embeddings, "start_forward", None) if self.overlap else None
        if start is not None:
            # Created between the exchange's start and its wait, the bottom MLP's autograd nodes are also
            # run between the gradients' exchange start and wait in backward (see sharding.comm.AsyncAllToAll).
            flight = start(sparse)
            bottom = self._bottom(dense)
            pooled = flight.wait()
        else:
            bottom, pooled = self._bottom(dense), self.embeddings(sparse)
        with self._compute(pooled):
            logit = self.top(self.interaction(bottom, pooled, self.dim)).squeeze(1)
            logit = logit if self.fm is None else logit + self.fm(pooled, self.dim)
        return logit if self.active_precision == "fp32" else logit.float()  # the loss and its batch sum in fp32

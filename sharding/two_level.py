"""The two-level output exchange: pooled rows go back to their samples' ranks within the node first,
then once between nodes per peer rank (TorchRec's TWRW output dist, HugeCTR's hierarchical all-to-all).

    out = TwoLevelOutput(emb.dst_shards, emb.dims, rank=3, world=4, ranks_per_node=2)
    pieces = out(pooled, batch_sizes, batch)   # per table: [(col_start, [batch, width] tensor), ...]

Ranks form nodes of G consecutive ranks: rank r is (node r // G, local rank r % G). From the pooled
rows a rank looked up for every source rank's samples:

1. within node n: rank (n, l') sends to (n, l) the rows of the samples of every rank (m, l), all
   nodes m (an all-to-all in node n's group);
2. (n, l) adds up the partial sums of the row shards of one table and column range that node n holds,
   so the node sends one summed partial per sample instead of one per rank holding rows of the table;
3. between nodes: (n, l) sends to (m, l) the summed rows of (m, l)'s samples (an all-to-all among
   the ranks of local rank l, one per node).

Both all-to-alls are ``comm.all_to_all`` (differentiable) and the sums are autograd ops, so backward
runs it reversed: gradients cross nodes once per sample, are copied to every rank of the node that
contributed to the sum, and go back within the node. The ids still reach their shards in one flat
all-to-all (``runtime.start_input_dist``): a row shard gets only its own ids, so the bytes that cross
nodes are the same either way; the saving is in the pooled rows and their gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sharding.comm import all_to_all
from sharding.lookup import Placed
from sharding.types import PlanError

Key = tuple[int, int, int]  # (table, col_start, width): one piece of output columns


def node_groups(world: int, ranks_per_node: int, rank: int):
    """(this rank's node group, its peer group: the ranks of its local rank on every node). Every rank
    creates every group in the same order, as ``dist.new_group`` requires."""
    nodes = world // ranks_per_node
    mine = {}
    for n in range(nodes):
        ranks = list(range(n * ranks_per_node, (n + 1) * ranks_per_node))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["intra"] = group
    for local in range(ranks_per_node):
        ranks = [n * ranks_per_node + local for n in range(nodes)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["inter"] = group
    return mine["intra"], mine["inter"]


def node_layout(dst_shards: list[list[Placed]], node_ranks: range) -> list[Key]:
    """The output pieces a node's shards make, each once: row shards of one table and column range
    share one (their partial sums are added inside the node)."""
    return sorted({(p.table, p.shard.col_start, p.shard.width) for d in node_ranks for p in dst_shards[d]})


class TwoLevelOutput:
    """Sends a rank's pooled rows [rows of every source's samples, its width] back as described in the
    module docstring; ``__call__`` returns this rank's output pieces per table."""

    def __init__(self, dst_shards: list[list[Placed]], dims: list[int], rank: int, world: int,
                 ranks_per_node: int, group=None):
        if group is not None:  # a caller's group, or a HorovodGroup
            # The node subgroups are made from the default group's ranks; a caller's own group would
            # need every rank outside it to create them too.
            raise PlanError("two_level exchange runs on torch.distributed's default process group only")
        if world % ranks_per_node:
            raise PlanError(f"two_level exchange: {world} ranks do not split into nodes of {ranks_per_node}")
        self.g, self.nodes, self.rank, self.dims = ranks_per_node, world // ranks_per_node, rank, dims
        self.node, self.local = divmod(rank, ranks_per_node)
        self.width = [sum(p.shard.width for p in shards) for shards in dst_shards]
        self.layouts = [node_layout(dst_shards, range(n * self.g, (n + 1) * self.g)) for n in range(self.nodes)]
        self.node_width = [sum(w for _, _, w in layout) for layout in self.layouts]
        # For each rank of my node: where each of its pieces goes in my node's layout.
        index = {key: k for k, key in enumerate(self.layouts[self.node])}
        self.slots = [[index[(p.table, p.shard.col_start, p.shard.width)] for p in dst_shards[d]]
                      for d in self._node_ranks(self.node)]
        self.piece_widths = [[p.shard.width for p in dst_shards[d]] for d in self._node_ranks(self.node)]
        self.intra, self.inter = node_groups(world, ranks_per_node, rank) if world > 1 else (None, None)

    def _node_ranks(self, n: int) -> range:
        return range(n * self.g, (n + 1) * self.g)

    def __call__(self, pooled: torch.Tensor, batch_sizes: list[int], batch: int):
        summed = self._within_node(pooled, batch_sizes)
        return self._between_nodes(summed, batch_sizes, batch)

    def _peers(self, local: int) -> list[int]:
        """The ranks of local rank ``local``, node by node: whose samples (n, local) collects."""
        return [m * self.g + local for m in range(self.nodes)]

    def _within_node(self, pooled: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
        """Steps 1 and 2: [samples of my peer ranks, node width], the node's partial sums added."""
        chunks = torch.split(pooled, batch_sizes)
        w = self.width[self.rank]
        send = [chunks[s] for l in range(self.g) for s in self._peers(l)]
        rows_for = [sum(batch_sizes[s] for s in self._peers(l)) for l in range(self.g)]
        mine = rows_for[self.local]
        recv = [mine * self.width[d] for d in self._node_ranks(self.node)]
        flat = torch.cat(send).reshape(-1) if send else pooled.reshape(-1)
        got = all_to_all(flat, [r * w for r in rows_for], recv, self.intra)
        sums: list[torch.Tensor | None] = [None] * len(self.layouts[self.node])
        # Senders in local-rank order, so every rank adds the same partials in the same order.
        for block, d, slots, widths in zip(torch.split(got, recv), self._node_ranks(self.node), self.slots,
                                           self.piece_widths):
            for k, piece in zip(slots, torch.split(block.view(mine, self.width[d]), widths, 1)):
                sums[k] = piece if sums[k] is None else sums[k] + piece
        if not sums:
            return got.new_zeros(mine, 0)
        return torch.cat(sums, dim=1)

    def _between_nodes(self, summed: torch.Tensor, batch_sizes: list[int], batch: int):
        """Step 3, and the received node blocks cut into their pieces per table."""
        rows = [batch_sizes[s] for s in self._peers(self.local)]
        w = self.node_width[self.node]
        recv = [batch * nw for nw in self.node_width]
        got = all_to_all(summed.reshape(-1), [r * w for r in rows], recv, self.inter)
        pieces: list[list[tuple[int, torch.Tensor]]] = [[] for _ in self.dims]
        for block, layout, nw in zip(torch.split(got, recv), self.layouts, self.node_width):
            for (table, col, _), piece in zip(layout, torch.split(block.view(batch, nw), [k[2] for k in layout], 1)):
                pieces[table].append((col, piece))
        return pieces


def assemble(pieces: list[list[tuple[int, torch.Tensor]]], batch: int) -> torch.Tensor:
    """[batch, sum of dims]: per table, pieces of one column range added, column ranges side by side.

        assemble([[(0, a), (0, b)], [(0, c), (4, d)]], batch=2)   # [a + b | c d]
    """
    out = []
    for table_pieces in pieces:
        by_col: dict[int, torch.Tensor] = {}
        for col, piece in table_pieces:  # row-wise pieces of different nodes share a column range
            by_col[col] = by_col[col] + piece if col in by_col else piece
        out.append(torch.cat([by_col[c] for c in sorted(by_col)], dim=1))
    return torch.cat(out, dim=1) if out else torch.zeros(batch, 0)

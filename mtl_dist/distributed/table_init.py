"""Re-initialise the (sharded) embedding tables in place and reset their fused optimizer state.

What ``train.multi_epoch = meda`` does at the start of every epoch after the first (Fan et al.,
"Multi-Epoch Learning with Data Augmentation for Deep Click-Through Rate Prediction", 2024:
the embedding layer is re-initialised each epoch, the MLP kept, so every epoch shows the dense
part the same rows through new embeddings):

* every table's rows are drawn again from the distribution they were built with
  (``U(weight_init_min, weight_init_max)`` of its ``EmbeddingBagConfig``), from a stream that
  depends only on ``(seed, epoch, table, row block)`` (:func:`table_block`): the same values at
  any world size, sharding type or plan, and on a resumed run;
* the embedding optimizer's state (row-wise Adagrad's ``momentum1``, Adagrad's sums) is set to
  zero, its value at build time; the dense parameters and the dense optimizer are untouched.

Each rank writes only its own shards: row-wise / table-wise / column-wise ``ShardedTensor``
local shards (each the slice of the table at its ``shard_offsets``), and the full replica of a
data-parallel table (the same values on every rank, so no broadcast is needed).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig

ROW_BLOCK = 1 << 16  # rows per independently seeded block: a shard draws only its blocks


def block_seed(seed: int, epoch: int, table: str, block: int) -> int:
    """The generator seed of rows ``[block·ROW_BLOCK, (block+1)·ROW_BLOCK)`` of ``table`` at
    ``epoch`` (a 63-bit blake2b digest of the four)."""
    key = f"{seed}/{epoch}/{table}/{block}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def table_block(cfg: EmbeddingBagConfig, seed: int, epoch: int, block: int) -> torch.Tensor:
    """Rows of block ``block`` of table ``cfg.name`` as re-initialised at ``epoch``: float32
    ``[min(ROW_BLOCK, N − block·ROW_BLOCK), D]``, uniform in ``[weight_init_min,
    weight_init_max]`` (TorchRec's default ±1/√N where the config sets none)."""
    rows = min(ROW_BLOCK, cfg.num_embeddings - block * ROW_BLOCK)
    lo, hi = _init_range(cfg)
    g = torch.Generator().manual_seed(block_seed(seed, epoch, cfg.name, block))
    return torch.empty(rows, cfg.embedding_dim).uniform_(lo, hi, generator=g)


def reference_table(cfg: EmbeddingBagConfig, seed: int, epoch: int) -> torch.Tensor:
    """The whole table ``[N, D]`` as :func:`reinit_tables` writes it (for tests and checks)."""
    blocks = (cfg.num_embeddings + ROW_BLOCK - 1) // ROW_BLOCK
    return torch.cat([table_block(cfg, seed, epoch, b) for b in range(blocks)])


def _init_range(cfg: EmbeddingBagConfig) -> tuple[float, float]:
    default = (1.0 / cfg.num_embeddings) ** 0.5
    lo = cfg.weight_init_min if cfg.weight_init_min is not None else -default
    hi = cfg.weight_init_max if cfg.weight_init_max is not None else default
    return lo, hi


def table_configs(model: nn.Module) -> dict[str, EmbeddingBagConfig]:
    """Every embedding table of ``model`` (plain or DMP-wrapped: shared, STEM's per-task and
    managed-collision tables) by name. Reads the collections' ``_embedding_bag_configs``, which
    TorchRec's plain and sharded EmbeddingBagCollection both keep."""
    found: dict[str, EmbeddingBagConfig] = {}
    for m in model.modules():
        for c in getattr(m, "_embedding_bag_configs", None) or []:
            if isinstance(c, EmbeddingBagConfig):
                found.setdefault(c.name, c)
    return found


def _pieces(t: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
    """This rank's pieces of a table state-dict entry: ``(tensor [r, c], row0, col0)``."""
    if isinstance(t, ShardedTensor):
        return [(s.tensor, *s.metadata.shard_offsets) for s in t.local_shards()]
    if type(t) is torch.Tensor or isinstance(t, nn.Parameter):
        return [(t, 0, 0)]  # a data-parallel table: the full replica
    raise TypeError(f"table re-initialisation: unsupported table tensor type {type(t).__name__}")


@torch.no_grad()
def _fill(piece: torch.Tensor, row0: int, col0: int, cfg: EmbeddingBagConfig, seed: int,
          epoch: int) -> None:  # fmt: skip
    rows, cols = piece.shape
    first, last = row0 // ROW_BLOCK, (row0 + rows - 1) // ROW_BLOCK
    for b in range(first, last + 1):
        block = table_block(cfg, seed, epoch, b)
        lo, hi = max(row0, b * ROW_BLOCK), min(row0 + rows, b * ROW_BLOCK + block.shape[0])
        src = block[lo - b * ROW_BLOCK : hi - b * ROW_BLOCK, col0 : col0 + cols]
        piece[lo - row0 : hi - row0].copy_(src)


def table_keys(model: nn.Module) -> dict[str, EmbeddingBagConfig]:
    """The state-dict keys of ``model``'s table weights (``….embedding_bags.<table>.weight``)
    with each table's config."""
    configs = table_configs(model)
    keys = {}
    for key in model.state_dict():
        parts = key.split(".")
        is_table = len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags"
        if is_table and parts[-2] in configs:
            keys[key] = configs[parts[-2]]
    return keys


def reinit_tables(model: nn.Module, seed: int, epoch: int) -> list[str]:
    """Draw every table of ``model`` (plain or DMP-wrapped) anew, in place, from its build-time
    distribution with the stream of ``(seed, epoch)``; each rank writes its own shards.
    Returns the tables' names.

    Raises:
        TypeError: a table stored as something other than a ShardedTensor or a tensor.
    """
    sd = model.state_dict()
    keys = table_keys(model)
    for key, cfg in keys.items():
        for piece, row0, col0 in _pieces(sd[key]):
            _fill(piece, row0, col0, cfg, seed, epoch)
    return sorted(c.name for c in keys.values())


def _zero(t: object) -> int:
    """Zero a state entry in place (its local shards); returns the elements this rank holds."""
    if not isinstance(t, torch.Tensor):
        return 0
    pieces = [s.tensor for s in t.local_shards()] if isinstance(t, ShardedTensor) else [t]
    for piece in pieces:
        piece.zero_()
    return sum(p.numel() for p in pieces)


@torch.no_grad()
def reset_optimizer_state(
    model: nn.Module, fused: torch.optim.Optimizer, dense: torch.optim.Optimizer | None = None
) -> int:
    """Set the tables' optimizer state to its build-time value, zero, in place: every state
    tensor of ``fused`` (the DMP model's ``fused_optimizer``: row-wise Adagrad's ``momentum1``,
    Adagrad's sums), and, in ``dense`` (the torch optimizer of the dense part), the state of
    the tables it trains — data-parallel tables have no fused kernel, their rows are dense
    parameters (Adam's moments and step count zeroed; the dense layers' state is kept).
    Returns how many elements this rank reset."""
    n = sum(_zero(t) for per_param in fused.state.values() for t in per_param.values())
    if dense is not None:
        keys = table_keys(model)
        tables = {id(p) for name, p in model.named_parameters() if name in keys}
        for p, per_param in dense.state.items():
            if id(p) in tables:
                n += sum(_zero(t) for t in per_param.values())
    return n

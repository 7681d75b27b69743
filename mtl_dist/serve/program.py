"""The ranker as a self-contained program for serving: raw ids and dense values in, each task's
served value out, with nothing of TorchRec, fbgemm or mtl_dist needed to run it.

:func:`build_served` turns a trained :class:`~mtl_dist.loop.losses.ModelWithLoss` into a
:class:`ServedRanker` of plain modules — every TorchRec table (STEM's per-task ones too) copied
into an ``nn.EmbeddingBag`` (or, for ``int8``, a :class:`RowwiseInt8Bag`), the dense
normalisation and head as trained, then what :func:`mtl_dist.loop.losses.task_predictions` and
``mtl_dist.serve.score`` do on the way out: the sigmoid, the negative-downsampling correction, ESMM's
pCTR × pCVR and the label transforms' inverses (``log1p`` → ``expm1``). :func:`export_program`
runs ``torch.export`` over it with a dynamic batch (and bag) size; :func:`write_package` stores
the program (eager, or compiled with AOTInductor) with :func:`metadata` as
``extra/mtl_dist.json`` in one ``.pt2`` archive.

Inputs of the program (flat, in this order; F sparse features in config order, then each
sequence's id lists, then each sequence's float side columns: metadata ``inputs``)::

    dense        [B, Dd] float32, the dense columns in metadata order
    values[f]    [N_f] int64, feature f's ids, bag after bag (strings already hashed);
                 float32 for a float side column (metadata ``sequence_floats``)
    offsets[f]   [B + 1] int64, bag i is values[f][offsets[f][i]:offsets[f][i + 1]]

Output: ``[B, T]`` float32, task by task in metadata order.

What a client does and what the program does with ids is split so that the program never sees
a string: the client hashes string ids (``xxh3_64(utf-8 bytes, seed) mod hash_buckets``, the
rule in the metadata), drops nulls and empty strings (or refuses them under
``invalid_ids = "error"``) and refuses integer ids outside ``[0, vocab_size)`` for features
whose policy is ``error``; the program's :class:`IdRemap` applies every integer rule training
applies (``mod hash_buckets``, ``clip``, ``hash``, ``drop``). A later remapping (managed
collisions) replaces :class:`IdRemap` alone.

The parts: :mod:`mtl_dist.serve.lookups` (id rules, embedding bags), :mod:`mtl_dist.serve.served`
(the served module and its export) and :mod:`mtl_dist.serve.package` (metadata, writing, reading
and verifying packages); this module names them all in one place.
"""

from mtl_dist.serve.lookups import IdRemap, PooledEmbeddings, RowwiseInt8Bag
from mtl_dist.serve.package import (
    FORMAT,
    METADATA,
    check_package,
    load_package,
    metadata,
    read_metadata,
    write_package,
)
from mtl_dist.serve.served import (
    EMBEDDING_DTYPES,
    ServedRanker,
    build_served,
    example_inputs,
    export_program,
    inputs_from_batch,
)

__all__ = [
    "EMBEDDING_DTYPES",
    "FORMAT",
    "METADATA",
    "IdRemap",
    "PooledEmbeddings",
    "RowwiseInt8Bag",
    "ServedRanker",
    "build_served",
    "check_package",
    "example_inputs",
    "export_program",
    "inputs_from_batch",
    "load_package",
    "metadata",
    "read_metadata",
    "write_package",
]

"""Process group and device (:mod:`~mtl_dist.distributed.setup`), the collectives helpers
(:mod:`~mtl_dist.distributed.collectives`: the only place that reduces, gathers or broadcasts
across ranks, besides the guard's asynchronous all-gather), the sharding plan and DMP
(:mod:`~mtl_dist.distributed.sharding`, the only ``torchrec.distributed`` user), and the
fbgemm CPU kernel it supplies.

May import: config, files.
"""

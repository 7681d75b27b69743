"""Public multi-task benchmarks, raw files in, mtl-dist's Parquet out (``mtl-prepare``).

One module per dataset, each with ``prepare(raw_dir, out_dir) -> dict`` (writes
``OUT/{train,val,test}/part-*.parquet`` and returns ``dataset.json``'s content) and
``configs(dataset_info, data_dir) -> {file name: TOML text}``:

- ``census``: Census-Income (KDD), UCI (:mod:`.census`)
- ``aliccp``: Ali-CCP, Alibaba click and conversion prediction (:mod:`.aliccp`)
- ``aliexpress``: AliExpress country splits NL / ES / FR / US (:mod:`.aliexpress`)
- ``kuairand``: KuaiRand Pure / 1K, logs joined with user and video features (:mod:`.kuairand`)

May import: config, files, data (the data stage).
"""

from __future__ import annotations

from types import ModuleType

from mtl_dist.data.public import aliccp, aliexpress, census, kuairand
from mtl_dist.data.public.common import PrepareError

DATASETS: dict[str, ModuleType] = {
    "census": census,
    "aliccp": aliccp,
    "aliexpress": aliexpress,
    "kuairand": kuairand,
}

__all__ = ["DATASETS", "PrepareError"]

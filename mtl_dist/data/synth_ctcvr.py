"""The funnel dataset as the peer baselines take it (:func:`ctcvr_view`): the same rows and
files, with ``click`` and ``purchase`` (= click and conversion, the ESMM paper's CTCVR label)
labelled on every row.

Reads ``SRC/meta.json`` and the files it names; writes ``DST/<same relative names>`` and
``DST/meta.json`` (``ValueError`` when ``SRC`` is not a funnel dataset; a missing or unreadable
source file raises as ``pyarrow`` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_dist.data.synth_stats import oracle_metrics
from mtl_dist.data.synth_write import files_present, write_meta
from mtl_dist.files import read_json


def ctcvr_view(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], verbose: bool = True
) -> dict[str, Any]:
    """The funnel dataset at ``src`` as the peers take it, written under ``dst``.

    Same rows and files; the single-hot sparse features and the dense ones, ``click`` and
    ``purchase`` = click and conversion (the ESMM paper's CTCVR label: 0 where there was no
    click) on every row, with ``p_click`` and ``p_purchase`` = p_click * p_conversion. The
    multi-hot lists, ``conversion`` and ``watch_time`` are left out: the peers' MMoE takes
    neither variable-length ids nor null labels. Reused when ``dst/meta.json`` names the same
    source parameters.
    """
    src, out = Path(src), Path(dst)
    meta = read_json(src / "meta.json", "dataset description", "mtl-datagen")
    if meta["columns"]["multi_hot"] == [] or "conversion" not in meta["columns"]["labels"]:
        raise ValueError(f"{src} is not a funnel dataset")
    source = {"path": str(src.resolve()), "params": meta["params"]}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("source") == source and files_present(out, old["splits"]):
            return old
    meta_path.unlink(missing_ok=True)
    sparse = [f["name"] for f in meta["columns"]["sparse"]]
    dense = list(meta["columns"]["dense"])
    splits: dict[str, Any] = {}
    for split, info in meta["splits"].items():
        stats: dict[str, list[np.ndarray]] = {}
        for name in info["files"]:
            table = pq.read_table(src / name)
            click = table["click"].to_numpy().astype(bool)
            conv = table["conversion"].fill_null(0).to_numpy().astype(bool)
            p_click = table["p_click"].to_numpy()
            p_purchase = (p_click * table["p_conversion"].to_numpy()).astype(np.float32)
            view = table.select([*sparse, *dense]).append_column("click", table["click"])
            view = view.append_column("purchase", pa.array((click & conv).astype(np.int8)))
            view = view.append_column("p_click", table["p_click"])
            view = view.append_column("p_purchase", pa.array(p_purchase))
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                view,
                out / name,
                row_group_size=meta["params"]["row_group_size"],
                write_page_checksum=True,
            )
            for key, arr in (("click", click), ("p_click", p_click)):
                stats.setdefault(key, []).append(arr)
            stats.setdefault("purchase", []).append(click & conv)
            stats.setdefault("p_purchase", []).append(p_purchase)
        st = {key: np.concatenate(arrs) for key, arrs in stats.items()}
        splits[split] = {"files": info["files"], **oracle_metrics(st)}
    view_meta = {
        "generator": "mtl_dist.data.synth.ctcvr_view",
        "source": source,
        "params": {**meta["params"], "workload": "funnel_ctcvr"},
        "columns": {
            "strings": {},
            "sparse": meta["columns"]["sparse"],
            "multi_hot": [],
            "dense": dense,
            "labels": {"click": "int8", "purchase": "int8"},
            "truth": {"click": "p_click", "purchase": "p_purchase"},
        },
        "splits": splits,
    }
    write_meta(meta_path, view_meta)
    if verbose:
        v = splits["val"]
        print(
            f"wrote {out} (funnel as click / purchase on every row): val click rate "
            f"{v['click_rate']:.3f} oracle AUC {v['oracle']['click_auc']:.3f}, purchase rate "
            f"{v['purchase_rate']:.3f} oracle AUC {v['oracle']['purchase_auc']:.3f}"
        )
    return view_meta

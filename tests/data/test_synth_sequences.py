"""``mtl-datagen --workload sequences``: its columns, the rule click follows (a past item in the
candidate's cluster), determinism by seed."""

import numpy as np
import pyarrow.parquet as pq

from mtl_dist.data.synth import main
from mtl_dist.data.synth_sequences import CLUSTERS, ITEMS


def test_cli_writes_the_workload_and_click_hangs_on_one_past_item(tmp_path):
    main(["--workload", "sequences", "--out", str(tmp_path / "a"), "--train-rows", "3000",
          "--val-rows", "500", "--files", "2", "--seed", "7"])  # fmt: skip
    t = pq.read_table(tmp_path / "a" / "train")
    assert t.num_rows == 3000 and pq.read_table(tmp_path / "a" / "val").num_rows == 500
    assert str(t.schema.field("hist_item_ids").type) == "list<element: int64>"
    item = t["item_id"].to_numpy()
    hist = t["hist_item_ids"].to_pylist()
    assert max(map(len, hist)) <= 20 and any(len(h) == 0 for h in hist)
    assert all(0 <= i < ITEMS for h in hist for i in h)
    assert t["hist_category_ids"].to_pylist() == [[i % CLUSTERS for i in h] for h in hist]
    match = np.array([any(i % CLUSTERS == c % CLUSTERS for i in h) for h, c in zip(hist, item)])
    p = t["p_click"].to_numpy()
    assert p[match].min() > 0.8 and p[~match].max() < 0.2  # decided by the match
    click = t["click"].to_numpy()
    assert click[match].mean() > 0.8 and click[~match].mean() < 0.2
    main(["--workload", "sequences", "--out", str(tmp_path / "b"), "--train-rows", "3000",
          "--val-rows", "500", "--files", "2", "--seed", "7"])  # fmt: skip
    assert pq.read_table(tmp_path / "b" / "train").equals(t)

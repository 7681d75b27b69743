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


def test_ages_are_aligned_increasing_toward_older_items_and_decide_recent():
    from mtl_dist.data.synth_sequences import RECENCY_S, make_rows

    t = make_rows(3000, np.random.default_rng(3))
    hist, ages = t["hist_item_ids"].to_pylist(), t["hist_age_s"].to_pylist()
    assert str(t.schema.field("hist_age_s").type) == "list<item: float>"
    assert [len(a) for a in ages] == [len(h) for h in hist]
    assert all(x > 0 for a in ages for x in a)
    assert all(a[i] > a[i + 1] for a in ages for i in range(len(a) - 1))  # oldest first
    item = t["item_id"].to_numpy()
    near = np.array([
        max([np.exp(-x / RECENCY_S) for i, x in zip(h, a) if i % CLUSTERS == c % CLUSTERS],
            default=0.0)
        for h, a, c in zip(hist, ages, item)
    ])  # fmt: skip
    p = t["p_recent"].to_numpy()
    assert np.corrcoef(near, p)[0, 1] > 0.95
    before = make_rows(3000, np.random.default_rng(3))  # deterministic by seed
    assert before.select(["hist_item_ids", "click", "like"]).equals(
        t.select(["hist_item_ids", "click", "like"])
    )

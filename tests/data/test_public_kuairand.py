"""mtl-prepare kuairand: standard logs, user and video features in the KuaiRand format (headers,
quoted tag lists, empty tags and durations, a log user without a features line), prepared and
checked against the join computed here by hand; malformed lines name file, line and field; the
generated config trains 2 ranks under torchrun."""

from __future__ import annotations

import json
import random

import pyarrow.dataset as ds
import pytest

from mtl_dist.data.public import PrepareError
from mtl_dist.data.public.__main__ import run
from mtl_dist.data.public.kuairand import LABELS
from tests.conftest import torchrun

USER_COLS = ["user_id", "user_active_degree", "follow_user_num", "follow_user_num_range",
             "fans_user_num", "friend_user_num", "register_days", "onehot_feat0"]  # fmt: skip
VIDEO_COLS = ["video_id", "author_id", "video_type", "upload_dt", "video_duration", "music_id",
              "tag"]  # fmt: skip
LOG_COLS = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like",
            "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms",
            "is_profile_enter", "is_rand", "tab"]  # fmt: skip


def csv(path, header, rows):
    """Values holding a comma are quoted, as pandas writes them (a tag list, a range)."""
    text = [",".join(f'"{v}"' if "," in v else v for v in r) for r in rows]
    path.write_text("\n".join([",".join(header), *text]) + "\n")


def make(d, rng):
    users = [[str(u), rng.choice(["full_active", "high_active", "UNKNOWN"]), str(rng.randrange(50)),
              rng.choice(["0", "(0,10]"]), str(rng.randrange(9)), "1", str(rng.randrange(400)),
              str(rng.randrange(3))] for u in range(20)]  # fmt: skip
    videos = []
    for v in range(30):
        tags = rng.choice(["", "8", "8,34", "2,10,34"])
        duration = "" if v % 7 == 0 else str(rng.randrange(5000, 90000))
        videos.append([str(v), str(rng.randrange(12)), rng.choice(["NORMAL", "AD"]), "20220101",
                       duration, str(rng.randrange(5)), tags])  # fmt: skip
    csv(d / "user_features_pure.csv", USER_COLS, users)
    csv(d / "video_features_basic_pure.csv", VIDEO_COLS, videos)
    logs = {}
    for name, n, date in (("4_08_to_4_21", 200, "20220410"), ("4_22_to_5_08", 81, "20220501")):
        rows = []
        for i in range(n):
            labels = [str(int(rng.random() < p)) for p in (0.4, 0.05, 0.01, 0.01, 0.01, 0.01)]
            rows.append([str(25 if i % 23 == 0 else rng.randrange(20)), str(rng.randrange(30)),
                         date, str(rng.randrange(24) * 100 + rng.randrange(60)), "0", *labels,
                         str(int(rng.random() < 0.3)), "1234", "0", "0", str(rng.randrange(3))])  # fmt: skip
        csv(d / f"log_standard_{name}_pure.csv", LOG_COLS, rows)
        logs[name] = rows
    return users, videos, logs


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("kuairand_raw")
    return d, *make(d, random.Random(3))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("kuairand_out")
    return out, run("kuairand", raw[0], out)


def vocab(values):
    return {v: i + 1 for i, v in enumerate(sorted(set(values)))}


def expected(users, videos, logs):
    ui = {c: i for i, c in enumerate(USER_COLS)}
    vi = {c: i for i, c in enumerate(VIDEO_COLS)}
    li = {c: i for i, c in enumerate(LOG_COLS)}
    ucat = [c for c in USER_COLS if c not in ("follow_user_num", "fans_user_num",
                                               "friend_user_num", "register_days")]  # fmt: skip
    vcat = [c for c in VIDEO_COLS if c not in ("upload_dt", "video_duration", "tag")]
    uv = {c: vocab(r[ui[c]] for r in users) for c in ucat}
    vv = {c: vocab(r[vi[c]] for r in videos) for c in vcat}
    tag_of = {r[0]: [t for t in r[vi["tag"]].split(",") if t] for r in videos}
    tv = vocab(t for ts in tag_of.values() for t in ts)
    train = logs["4_08_to_4_21"]
    lv = {"tab": vocab(r[li["tab"]] for r in train),
          "hour": vocab(str(int(r[li["hourmin"]]) // 100) for r in train)}  # fmt: skip
    by_user, by_video = {r[0]: r for r in users}, {r[0]: r for r in videos}

    def row(r):
        u, v = by_user.get(r[li["user_id"]]), by_video[r[li["video_id"]]]
        e = {c: uv[c][u[ui[c]]] if u else 0 for c in ucat}
        for c in ("follow_user_num", "fans_user_num", "friend_user_num", "register_days"):
            e[c] = float(u[ui[c]]) if u else None
        e |= {c: vv[c][v[vi[c]]] for c in vcat}
        e["video_duration"] = float(v[vi["video_duration"]]) if v[vi["video_duration"]] else None
        e["tag"] = [tv[t] for t in tag_of[v[0]]]
        e["tab"] = lv["tab"].get(r[li["tab"]], 0)
        e["hour"] = lv["hour"].get(str(int(r[li["hourmin"]]) // 100), 0)
        e["date"] = int(r[li["date"]])
        return {**e, **{n: int(r[li[n]]) for n in LABELS}}

    test = logs["4_22_to_5_08"]
    # header = line 1: record k on line k + 2, odd lines (k odd) → val
    return {"train": [row(r) for r in train], "val": [row(r) for r in test[1::2]],
            "test": [row(r) for r in test[0::2]]}  # fmt: skip


def test_rows_match_the_join_by_hand(raw, prepared):
    d, users, videos, logs = raw
    out, info = prepared
    for split, want in expected(users, videos, logs).items():
        got = ds.dataset(out / split).to_table().to_pylist()
        assert got == want, split
        assert info["splits"][split]["rows"] == len(want)
    assert info["multi_hot"] == ["tag"] and "video_duration" in info["dense"]
    assert len(info["sources"]) == 4


def test_malformed_line_names_file_line_and_field(raw, tmp_path):
    d = raw[0]
    bad = tmp_path / "raw"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    path = bad / "log_standard_4_08_to_4_21_pure.csv"
    lines = path.read_text().split("\n")
    cols = lines[4].split(",")
    cols[LOG_COLS.index("long_view")] = "yes"
    lines[4] = ",".join(cols)
    path.write_text("\n".join(lines))
    with pytest.raises(PrepareError) as e:
        run("kuairand", bad, tmp_path / "out")
    assert "log_standard_4_08_to_4_21_pure.csv:5: field long_view:" in str(e.value), str(e.value)
    lines[4] = ",".join(cols[:-2])
    path.write_text("\n".join(lines))
    with pytest.raises(
        PrepareError, match="pure.csv:5: field is_rand: expected 16 columns, found 14"
    ):
        run("kuairand", bad, tmp_path / "out")


def test_generated_config_trains_two_ranks(prepared, tmp_path):
    out, _ = prepared
    proc = torchrun(
        [
            "-m", "mtl_dist.train", "--config", str(out / "kuairand.toml"),
            "--train.output_dir", str(tmp_path / "run"), "--train.progress_bar", "false",
            "--train.batch_size", "32", "--train.max_steps", "2", "--train.precision", "fp32",
        ]
    )  # fmt: skip
    assert proc.returncode == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_committed_config_loads():
    from mtl_dist.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(["--config", str(ROOT / "configs" / "kuairand.toml")])
    assert [t.label for t in cfg.tasks] == ["is_click", "long_view", "is_like"]

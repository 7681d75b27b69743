"""mtl_dist.files: records another process wrote are checked before use, and a bad one stops
naming the file, what it should be and which command writes it."""

from __future__ import annotations

import json

import pytest

from mtl_dist.data.synth_ctcvr import ctcvr_view
from mtl_dist.files import read_json, written_whole


@pytest.mark.parametrize(
    "content, says",
    [
        ("", "the file is empty"),
        ('{"metrics": {"click/auc": 0.7', "not valid JSON (Expecting"),  # truncated
        ("[1, 2]", "a JSON list, not an object"),
        (b"\xff\xfe\x00garbage", "not text"),
    ],
)
def test_bad_records_are_named_with_their_producer(tmp_path, content, says):
    path = tmp_path / "metrics.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        read_json(path, "run's metrics", "mtl_dist.train")
    assert str(path) in str(e.value) and says in str(e.value)
    assert "not a complete run's metrics; mtl_dist.train writes one" in str(e.value)


def test_missing_record_names_its_producer_and_a_good_one_reads_back(tmp_path):
    with pytest.raises(FileNotFoundError, match="mtl_dist.train writes the run's metrics"):
        read_json(tmp_path / "metrics.json", "run's metrics", "mtl_dist.train")
    with written_whole(tmp_path / "metrics.json") as tmp:
        tmp.write_text(json.dumps({"metrics": {"click/auc": 0.71}}))
    assert read_json(tmp_path / "metrics.json", "x", "y") == {"metrics": {"click/auc": 0.71}}


def test_ctcvr_view_of_a_damaged_dataset_names_its_meta(tmp_path):
    src = tmp_path / "funnel"
    src.mkdir()
    (src / "meta.json").write_text('{"columns": {"sparse": [')  # cut short
    with pytest.raises(ValueError, match=r"funnel/meta.json: not valid JSON .*mtl-datagen"):
        ctcvr_view(src, tmp_path / "ctcvr")

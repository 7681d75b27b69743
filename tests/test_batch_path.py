"""One batch from Parquet to the backward passes through at most ten of our files (issue 27):
traced with ``sys.setprofile`` on both ranks of a real 2-rank torchrun job of the default config
(the pipelined step), from the reader to the start of the optimizer step."""

import json

from tests.conftest import torchrun

# the files README.md's "How one batch flows" names, in the order a batch meets them
BATCH_PATH = {
    "data/reader.py", "data/batch.py", "loop/step.py", "models/ranker.py", "models/heads.py",
    "models/head_parts.py", "models/experts.py", "models/gates.py", "loop/losses.py",
    "balancing/base.py",
}  # fmt: skip


def test_one_batch_passes_through_ten_files(small_synth_data, tmp_path):
    proc = torchrun(
        ["tests/batch_path_worker.py", str(small_synth_data), str(tmp_path)], timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        files = {k.split(":")[0] for k in calls}
        assert files == BATCH_PATH, sorted(files)
        # the trace saw the whole path: the Parquet reader, the forward and our backward
        for where in ("data/reader.py:_iter_worker", "models/heads.py:forward",
                      "loop/losses.py:task_losses", "loop/step.py:backward"):  # fmt: skip
            assert calls.get(where, 0) >= 1, where

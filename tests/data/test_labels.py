"""Labels: missing values masked row by row, conditions, sample weights, bad labels rejected."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtl_dist.config import SparseFeature, TaskSpec
from mtl_dist.data.batch import ArrowBatchConverter
from mtl_dist.data.reader import ParquetBatchReader
from mtl_dist.loop.losses import task_losses

SPARSE = [SparseFeature(name="item", vocab_size=10)]


def convert(tasks: list[TaskSpec], **cols) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(next(iter(cols.values())))
    batch = ArrowBatchConverter(SPARSE, [], tasks)(
        pa.table({"item": pa.array(np.zeros(n, np.int64)), **cols})
    )
    return batch.labels, batch.mask


def test_null_nan_and_sentinel_labels_are_masked_row_by_row():
    tasks = [
        TaskSpec(name="click", label="click", missing_values=[-1]),
        TaskSpec(name="watch", kind="regression", label="watch", transform="log1p"),
    ]
    labels, mask = convert(
        tasks,
        click=pa.array([1, 0, -1, None, 1], pa.int8()),
        watch=pa.array([3.0, float("nan"), None, 0.0, 7.0], pa.float32()),
    )
    assert mask[:, 0].tolist() == [1, 1, 0, 0, 1]
    assert mask[:, 1].tolist() == [1, 0, 0, 1, 1]
    np.testing.assert_allclose(labels[:, 1].numpy(), np.log1p([3.0, 0, 0, 0, 7.0]), rtol=1e-6)
    assert labels[mask == 0].abs().sum() == 0  # no NaN or sentinel leaks into the loss


def test_condition_and_sample_weights_shape_the_mask():
    tasks = [
        TaskSpec(name="click", label="click"),
        TaskSpec(name="conv", label="conv", condition="click", sample_weight="w"),
    ]
    # conversion logged as 0 (not null) on unclicked rows: the condition must mask them
    labels, mask = convert(
        tasks,
        click=pa.array([1, 0, 1, None], pa.int8()),
        conv=pa.array([1, 0, 0, 1], pa.int8()),
        w=pa.array([2.0, 1.0, 0.5, 1.0], pa.float32()),
    )
    assert mask[:, 0].tolist() == [1, 1, 1, 0]
    assert mask[:, 1].tolist() == [2.0, 0.0, 0.5, 0.0]
    # the loss is the weighted mean over counted rows: (2·bce(x,1) + 0.5·bce(x,0)) / 2.5
    out = torch.zeros(4, 2)
    losses = task_losses(out, labels, mask, torch.tensor([True, True]))
    torch.testing.assert_close(losses[1], torch.tensor(np.log(2.0), dtype=torch.float32))


def test_batch_without_any_label_gives_zero_loss_not_nan():
    labels, mask = convert(
        [TaskSpec(name="click", label="click"), TaskSpec(name="conv", label="conv")],
        click=pa.array([1, 0], pa.int8()),
        conv=pa.array([None, None], pa.int8()),
    )
    out = torch.randn(2, 2, requires_grad=True)
    losses = task_losses(out, labels, mask, torch.tensor([True, True]))
    assert losses[1].item() == 0.0 and torch.isfinite(losses).all()
    (g,) = torch.autograd.grad(losses.sum(), out)
    assert torch.isfinite(g).all() and g[:, 1].abs().sum() == 0


@pytest.mark.parametrize(
    "task,values,message",
    [
        (
            TaskSpec(name="click", label="y"),
            pa.array([0, 3, 1], pa.int64()),
            "not 0 or 1, e.g. 3.0",
        ),
        (
            TaskSpec(name="watch", kind="regression", label="y"),
            pa.array([1.0, float("inf")]),
            "not a finite number",
        ),
        (
            TaskSpec(name="watch", kind="regression", label="y", transform="log1p"),
            pa.array([1.0, -2.0]),
            "> -1 (log1p)",
        ),
        (TaskSpec(name="click", label="y"), pa.array(["a", "b"]), "expected a number, got string"),
    ],
)
def test_labels_outside_the_domain_are_rejected_naming_file_and_column(
    tmp_path, task, values, message
):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"item": pa.array([0] * len(values), pa.int64()), "y": values}), path)
    with pytest.raises(ValueError, match="column 'y'") as err:  # at start (types) or reading
        list(ParquetBatchReader([str(path)], ArrowBatchConverter(SPARSE, [], [task]), 2))
    assert str(path) in str(err.value) and message in str(err.value)


def test_invalid_labels_masked_when_configured():
    task = TaskSpec(name="click", label="click", on_invalid="mask")
    labels, mask = convert([task], click=pa.array([0, 3, 1, 2], pa.int64()))
    assert mask[:, 0].tolist() == [1, 0, 1, 0] and labels[:, 0].tolist() == [0, 0, 1, 0]


def test_bad_sample_weights_rejected():
    task = TaskSpec(name="click", label="click", sample_weight="w")
    with pytest.raises(ValueError, match="column 'w'.*negative, not finite"):
        convert([task], click=pa.array([0, 1], pa.int8()), w=pa.array([1.0, -1.0]))


# --- a finite float64 that overflows float32 must not slip through the cast ----------------


def test_label_beyond_float32_is_rejected_naming_file_column_task_and_value(tmp_path):
    """watch_time 1e39 (finite in float64, inf in float32) without a transform: an error, not
    an inf label that turns the run's loss NaN."""
    task = TaskSpec(name="watch", kind="regression", label="watch_time")
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"item": pa.array([0, 1, 2], pa.int64()),
                             "watch_time": pa.array([3.0, 1e39, 5.0])}), path)  # fmt: skip
    with pytest.raises(ValueError) as err:
        list(ParquetBatchReader([str(path)], ArrowBatchConverter(SPARSE, [], [task]), 3))
    msg = str(err.value)
    assert str(path) in msg and "column 'watch_time' (task watch)" in msg and "1e+39" in msg
    # masked under on_invalid = "mask"; under log1p the same value is a fine label (89.8)
    masked = TaskSpec(name="watch", kind="regression", label="watch_time", on_invalid="mask")
    labels, mask = convert([masked], watch_time=pa.array([3.0, 1e39]))
    assert mask[:, 0].tolist() == [1, 0] and labels[:, 0].tolist() == [3.0, 0.0]
    logged = TaskSpec(name="watch", kind="regression", label="watch_time", transform="log1p")
    labels, mask = convert([logged], watch_time=pa.array([3.0, 1e39]))
    assert mask[:, 0].tolist() == [1, 1] and labels[1, 0].item() == pytest.approx(89.8008, 1e-5)


def test_sample_weight_and_truth_beyond_float32_are_rejected():
    """Siblings of the label cast: sample weights and the oracle's truth column."""
    weighted = TaskSpec(name="click", label="click", sample_weight="w")
    with pytest.raises(ValueError, match=r"column 'w' \(sample weights of task click\).*1e\+39"):
        convert([weighted], click=pa.array([0, 1], pa.int8()), w=pa.array([1.0, 1e39]))
    watch = TaskSpec(name="watch", kind="regression", label="y", truth="t")
    with pytest.raises(ValueError, match=r"column 't' \(truth of task watch\).*1e\+39"):
        convert([watch], y=pa.array([1.0, 2.0]), t=pa.array([1.0, 1e39]))
    click = TaskSpec(name="click", label="y", truth="t")
    with pytest.raises(ValueError, match=r"truth of task click.*probability in \[0, 1\].*1.5"):
        convert([click], y=pa.array([1, 0], pa.int8()), t=pa.array([0.5, 1.5]))


def test_dense_overflow_error_names_the_stored_value():
    conv = ArrowBatchConverter(SPARSE, ["x"], [])
    with pytest.raises(ValueError, match=r"column 'x'.*not finite in float32, e.g. 1e\+39"):
        conv(pa.table({"item": pa.array([0, 1], pa.int64()), "x": pa.array([0.5, 1e39])}))


def test_uint64_ids_beyond_int64_are_not_wrapped():
    """A uint64 id >= 2^63 used to wrap to a negative int64 first: hashing then mapped it to
    another row than ``id mod buckets``."""
    big = 2**64 - 5
    ids = pa.array([3, big], pa.uint64())
    hashed = ArrowBatchConverter([SparseFeature(name="item", hash_buckets=10)], [], [])
    assert hashed(pa.table({"item": ids})).sparse.values().tolist() == [3, big % 10]
    strict = ArrowBatchConverter([SparseFeature(name="item", vocab_size=10)], [], [])
    with pytest.raises(ValueError, match=f"id {big} outside"):
        strict(pa.table({"item": ids}))


def test_validation_needs_no_sample_weight_and_training_no_truth_column(tmp_path):
    """Each reader asks only for the columns it uses: validation ignores sample weights,
    training ignores the oracle's truth."""
    task = TaskSpec(name="click", label="click", sample_weight="w", truth="p")
    base = {"item": pa.array([0, 1], pa.int64()), "click": pa.array([0, 1], pa.int8())}
    val, train = tmp_path / "val.parquet", tmp_path / "train.parquet"
    pq.write_table(pa.table({**base, "p": pa.array([0.2, 0.7])}), val)
    pq.write_table(pa.table({**base, "w": pa.array([2.0, 0.0])}), train)
    val_conv = ArrowBatchConverter(SPARSE, [], [task], sample_weights=False)
    (batch,) = ParquetBatchReader([str(val)], val_conv, 2, drop_last=False)
    # every labelled row counts in validation, a weight-0 training row included
    assert batch.mask[:, 0].tolist() == [1, 1] and batch.truth[:, 0].tolist() == pytest.approx(
        [0.2, 0.7]
    )
    (batch,) = ParquetBatchReader(
        [str(train)], ArrowBatchConverter(SPARSE, [], [task], truth=False), 2
    )
    assert batch.mask[:, 0].tolist() == [2, 0] and batch.truth.isnan().all()
    with pytest.raises(ValueError, match="missing column"):  # the full converter needs both
        ParquetBatchReader([str(val)], ArrowBatchConverter(SPARSE, [], [task]), 2)

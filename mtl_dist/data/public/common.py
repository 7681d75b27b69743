"""What every public-dataset preparer shares: CSV batches with line numbers, numbers parsed with
the line and field of a bad value named, vocabularies built on the training file, Parquet splits
written whole, and ``dataset.json``.

Errors: :class:`PrepareError` (a ``ValueError``) whose message starts ``FILE:LINE: field NAME:``
for a wrong column count, a non-numeric value where a number must be, or a malformed entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl_dist.files import PARQUET_CHECKSUMS, written_whole

BLOCK_BYTES = 1 << 24  # CSV bytes per streamed batch
ROW_GROUP = 65_536  # rows per Parquet row group
FILE_ROWS = 1 << 21  # rows per Parquet file before the next part starts
OOV = 0  # the id of a category unseen in training (vocabulary ids start at 1)


class PrepareError(ValueError):
    """A raw file that does not parse: ``FILE:LINE: field NAME: what``."""

    def __init__(self, path: str | Path, line: int | None, field: str, what: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: field {field}: {what}")
        self.path, self.line, self.field = str(path), line, field


def sha256(path: str | Path) -> str:
    """The hex sha256 digest of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def require(path: Path) -> Path:
    """``path`` if it is a file, else ``FileNotFoundError`` naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"raw file not found: {path}")
    return path


def csv_batches(
    path: Path,
    names: list[str],
    *,
    delimiter: str = ",",
    header: bool = False,
    quoting: bool = True,
    block_size: int | None = None,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Stream ``path`` as string columns ``names``; yields ``(line of the first row, batch)``.

    Format: delimited text, one record per line (an empty line is a record of empty strings,
    so line numbers stay exact), a header line first when ``header`` (its names are replaced
    by ``names``).

    Raises:
        PrepareError: a line with another number of columns than ``names``, naming file, line
            and the first field missing (or ``(after LAST)`` for a line too long).
    """
    bad: list[tuple[int | None, int, int, str]] = []

    def on_invalid(row: Any) -> str:
        # skipped, not "error": the reader stops cleanly and the error is raised outside it (an
        # error raised inside pyarrow's streaming reader could abort the process at exit)
        if not bad:
            at = row.number if row.number is not None and row.number > 0 else None
            bad.append((at, row.expected_columns, row.actual_columns, row.text[:120]))
        return "skip"

    reader_opts = pacsv.ReadOptions(
        column_names=names,
        skip_rows=int(header),
        use_threads=False,
        block_size=block_size or BLOCK_BYTES,
    )
    parse = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoting else False,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
        newlines_in_values=False,
    )
    convert = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, strings_can_be_null=False
    )
    line = 1 + int(header)
    try:
        with pacsv.open_csv(path, reader_opts, parse, convert) as reader:
            for batch in reader:
                if bad:  # (the batch holding the bad line is never yielded)
                    break
                yield line, batch
                line += batch.num_rows
    except pa.ArrowInvalid as e:
        raise PrepareError(path, None, "-", f"unparseable CSV: {e}") from None
    if bad:
        at, expected, actual, text = bad[0]
        field = names[actual] if actual < len(names) else f"(after {names[-1]})"
        raise PrepareError(
            path, at, field, f"expected {expected} columns, found {actual}: {text!r}"
        )


def numbers(
    col: pa.Array,
    to: pa.DataType,
    path: Path,
    lines: int | np.ndarray,
    field: str,
    *,
    blank: str = "error",
) -> pa.Array:
    """``col`` (strings, whitespace trimmed) as numbers of type ``to``; an empty string is null
    when ``blank`` is ``"null"``, else an error. ``lines``: the file line of ``col[0]`` (rows on
    consecutive lines) or the line of every value.

    Raises:
        PrepareError: the first value that is not a number, naming file, line and field.
    """
    col = pc.utf8_trim_whitespace(col)
    if blank == "null":
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
    try:
        return pc.cast(col, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for i, v in enumerate(col.to_pylist()):
            try:
                pc.cast(pa.array([v], pa.string()), to)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                at = lines + i if isinstance(lines, int) else int(lines[i])
                raise PrepareError(path, at, field, f"not a number: {v!r}") from None
        raise


class Vocab:
    """Category strings → ids 1..n in sorted order (0 is :data:`OOV`), one per column."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}
        self.values: dict[str, pa.Array] = {}

    def add(self, name: str, col: pa.Array) -> None:
        """Record the distinct values of ``col`` for column ``name`` (a training batch)."""
        self._seen.setdefault(name, set()).update(pc.unique(col).to_pylist())

    def freeze(self) -> None:
        """Fix the ids: each column's values sorted, id = position + 1."""
        self.values = {n: pa.array(sorted(s), pa.string()) for n, s in self._seen.items()}

    def encode(self, name: str, col: pa.Array) -> pa.Array:
        """int64 ids of ``col``'s values; a value unseen in training reads :data:`OOV`."""
        pos = pc.index_in(col, value_set=self.values[name])
        return pc.fill_null(pc.add(pos.cast(pa.int64()), 1), OOV)

    def sizes(self) -> dict[str, int]:
        """Rows each column's embedding table needs (values + the OOV row)."""
        return {n: len(v) + 1 for n, v in self.values.items()}


class SplitWriter:
    """Parquet files ``OUT/<split>/part-NNNNN.parquet`` of exact ``ROW_GROUP``-row groups (the
    last one of a split shorter), ``FILE_ROWS`` rows a file, each written whole
    (:func:`mtl_dist.files.written_whole`, page checksums); counts rows and positives. At most
    one row group's rows are held: a file is streamed to disk as it fills."""

    def __init__(self, out: Path, split: str, schema: pa.Schema, labels: list[str]):
        self.dir = out / split
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("part-*.parquet"):
            stale.unlink()
        self.schema, self.labels = schema, labels
        self.rows, self.files = 0, 0
        self.positives = dict.fromkeys(labels, 0)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file: tuple[ExitStack, pq.ParquetWriter] | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (cast to the schema); whole row groups go to disk at once."""
        table = table.select(self.schema.names).cast(self.schema)
        for name in self.labels:
            self.positives[name] += int(pc.sum(table[name]).as_py() or 0)
        self.rows += table.num_rows
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= ROW_GROUP:
            merged = pa.concat_tables(self._pending)
            self._emit(merged.slice(0, ROW_GROUP))
            self._pending, self._pending_rows = (
                [merged.slice(ROW_GROUP)],
                merged.num_rows - ROW_GROUP,
            )

    def _emit(self, group: pa.Table) -> None:
        """Write one row group into the open file (opening one first), closing it when full."""
        if self._file is None:
            stack = ExitStack()
            tmp = stack.enter_context(written_whole(self.dir / f"part-{self.files:05d}.parquet"))
            self._file = stack, pq.ParquetWriter(tmp, self.schema, **PARQUET_CHECKSUMS)
        self._file[1].write_table(group, row_group_size=ROW_GROUP)
        self._file_rows += group.num_rows
        if self._file_rows >= FILE_ROWS:
            self._end_file()

    def _end_file(self) -> None:
        if self._file is not None:
            stack, writer = self._file
            writer.close()
            stack.close()  # (renames the partial file into place)
            self.files += 1
            self._file, self._file_rows = None, 0

    def close(self) -> dict[str, Any]:
        """Write what is pending and close the file; the split's summary for ``dataset.json``."""
        if self._pending_rows:
            self._emit(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0
        self._end_file()
        return {
            "rows": self.rows,
            "files": self.files,
            "positive_rate": {
                n: (self.positives[n] / self.rows if self.rows else None) for n in self.labels
            },
        }


def lists(n: int, parent: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list array of ``n`` rows: row r holds ``values[parent == r]`` in order (parent sorted)."""
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(parent, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def alternate(n: int, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of a batch of ``n`` rows starting at file line ``first_line`` whose line is
    odd (validation) and even (test): the rule that halves a test file."""
    lines = np.arange(first_line, first_line + n)
    return np.flatnonzero(lines % 2 == 1), np.flatnonzero(lines % 2 == 0)


def write_dataset_json(out: Path, info: dict[str, Any]) -> None:
    """``OUT/dataset.json`` (indented, strict JSON), written whole."""
    with written_whole(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")


def vocab_then_split(
    train: Path,
    test: Path,
    batches: Any,
    categorical: list[str],
    table: Any,
    writers: dict[str, SplitWriter],
) -> Vocab:
    """The Census / AliExpress recipe: a vocabulary per ``categorical`` column built on the
    training file (a first pass), then ``train`` written to the train split and ``test``
    halved by line parity into validation (odd lines) and test (even lines).

    ``batches(path)`` yields ``(first line, {column: values})``; ``table(cols, vocab, path,
    line)`` turns one batch into the Parquet table written. Returns the vocabulary.
    """
    vocab = Vocab()
    for _, cols in batches(train):
        for n in categorical:
            vocab.add(n, cols[n])
    vocab.freeze()
    for line, cols in batches(train):
        writers["train"].write(table(cols, vocab, train, line))
    for line, cols in batches(test):
        part = table(cols, vocab, test, line)
        odd, even = alternate(part.num_rows, line)
        writers["val"].write(part.take(odd))
        writers["test"].write(part.take(even))
    return vocab


def binary_tasks(names: list[str], condition: dict[str, str] | None = None) -> str:
    """``[[tasks]]`` tables (TOML) of binary tasks labelled by their own column; ``condition``:
    a task's conditioning task (``{"conversion": "click"}``)."""
    condition = condition or {}
    return "\n".join(
        f'[[tasks]]\nname = "{t}"\nkind = "binary"\nlabel = "{t}"\n'
        + (f'condition = "{condition[t]}"\n' if t in condition else "")
        for t in names
    )


def job_config(
    header: str,
    data_dir: str,
    model: str,
    batch_size: int,
    epochs: int,
    output_dir: str,
    features: str,
    tasks: str,
) -> str:
    """A prepared copy's training config (TOML text): ``header`` (comment lines), the splits
    under ``data_dir``, the ``model`` tables (TOML), Adam at 1e-3, the ``features`` and
    ``tasks`` tables."""
    return f"""{header}
[data]
train_path = "{data_dir}/train"
val_path = "{data_dir}/val"

{model}
[optim]
dense_optimizer = "adam"
dense_lr = 0.001

[train]
batch_size = {batch_size}
epochs = {epochs}
output_dir = "{output_dir}"

{features}
{tasks}"""

"""Where the rows come from: Parquet files (paths, globs, directories, or URIs ``pyarrow.fs``
resolves), their hive partitions, and a row filter written as text.

* :func:`list_parquet_files` resolves ``data.train_path`` / ``val_path``: a directory (searched
  recursively), a glob, a file, a comma-separated list of those, or a URI (``file://``,
  ``s3://``, ``gs://``, ``hdfs://``: whatever ``pyarrow.fs.FileSystem.from_uri`` takes; the
  files are then named by URI, which ``pyarrow.parquet`` opens through the same filesystem).
* :func:`partition_values`: the ``key=value`` directories between a dataset's root and a file
  (hive-style: ``dt=2026-11-01/part-0.parquet``) are columns of every row of the file; values
  of digits only are integers, others strings. They can be read as features, labels or GAUC
  groups like file columns.
* :class:`RowFilter` (``data.train_filter`` / ``val_filter``): a boolean expression over file
  and partition columns, e.g. ``dt >= '2026-11-01' and dt < '2026-11-08' and hour < 12`` — the
  comparisons ``== != < <= > >=``, ``in [...]`` / ``not in``, ``and``, ``or``, ``not`` and
  parentheses over column names and literals. It is parsed with Python's own parser into a
  syntax tree that is checked node by node and turned into a ``pyarrow.compute`` expression:
  never evaluated as Python.
"""

from __future__ import annotations

import ast
import glob
import os
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs


def list_parquet_files(spec: str) -> list[str]:
    """Resolve a directory, a glob, a file, a URI or a comma-separated list of them into sorted
    Parquet files (URIs stay URIs). Raises ``FileNotFoundError`` naming the part that matched
    nothing."""
    files: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if "://" in part:
            found = _list_uri(part)
        elif os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "**", "*.parquet"), recursive=True))
        elif any(ch in part for ch in "*?["):
            found = sorted(glob.glob(part, recursive=True))
        elif os.path.exists(part):
            found = [part]
        else:
            raise FileNotFoundError(f"Parquet path not found: {part}")
        if not found:
            raise FileNotFoundError(f"no Parquet files under: {part}")
        files += found
    return files


def _list_uri(uri: str) -> list[str]:
    scheme = uri.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise FileNotFoundError(f"{uri}: {e}") from None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"Parquet path not found: {uri}")
    if info.type == pafs.FileType.File:
        return [uri]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    paths = sorted(
        f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    return [f"{scheme}://{p}" for p in paths]


def partition_values(path: str) -> dict[str, int | str]:
    """The ``key=value`` directories on ``path`` (digits only: an integer), outermost first."""
    out: dict[str, int | str] = {}
    for part in PurePosixPath(path.split("://", 1)[-1]).parts[:-1]:
        key, eq, value = part.partition("=")
        if eq and key:
            out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def with_partitions(table: pa.Table, parts: dict[str, int | str]) -> pa.Table:
    """``table`` with each partition value as a constant column."""
    for key, value in parts.items():
        if key not in table.column_names:
            kind = pa.string() if isinstance(value, str) else pa.int64()
            table = table.append_column(key, pa.array([value] * table.num_rows, kind))
    return table


_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


@dataclass
class RowFilter:
    """A parsed ``data.*_filter``: its text, the ``pyarrow.compute`` expression and the columns
    it reads."""

    text: str
    expression: pc.Expression
    columns: frozenset[str]

    @staticmethod
    def parse(text: str, key: str) -> RowFilter:
        """Parse ``text``; ``ValueError`` naming ``key`` and what is not allowed."""
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            raise ValueError(f"{key}: {text!r} is not an expression ({e.msg})") from None
        columns: set[str] = set()
        expr = _convert(tree.body, key, columns)
        return RowFilter(text, expr, frozenset(columns))

    def keep(self, table: pa.Table) -> np.ndarray:
        """Indices ``[k]`` (int64) of the rows of ``table`` the filter keeps."""
        n = table.num_rows
        marked = table.append_column("__row__", pa.array(np.arange(n, dtype=np.int64)))
        return marked.filter(self.expression).column("__row__").to_numpy()


def _literal(node: ast.AST, key: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    raise ValueError(f"{key}: {ast.unparse(node)!r} is not a literal (a string or a number)")


def _operand(node: ast.AST, key: str, columns: set[str]):
    if isinstance(node, ast.Name):
        columns.add(node.id)
        return pc.field(node.id)
    return pc.scalar(_literal(node, key))


def _convert(node: ast.AST, key: str, columns: set[str]) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_convert(v, key, columns) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node.op, ast.And) else (out | p)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_convert(node.operand, key, columns)
    if isinstance(node, ast.Compare):
        out, left = None, node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(left, ast.Name) or not isinstance(right, (ast.List, ast.Tuple)):
                    raise ValueError(
                        f"{key}: 'in' takes a column and a list, e.g. dt in ['a', 'b']"
                    )
                columns.add(left.id)
                values = pa.array([_literal(v, key) for v in right.elts])
                term = pc.field(left.id).isin(values)
                term = ~term if isinstance(op, ast.NotIn) else term
            elif type(op) in _OPS:
                a, b = _operand(left, key, columns), _operand(right, key, columns)
                term = {
                    "==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b,
                }[_OPS[type(op)]]  # fmt: skip
            else:
                raise ValueError(f"{key}: operator {type(op).__name__} is not allowed")
            out = term if out is None else out & term
            left = right
        return out
    raise ValueError(
        f"{key}: {ast.unparse(node)!r} is not allowed (comparisons of columns and literals "
        "joined by and / or / not)"
    )

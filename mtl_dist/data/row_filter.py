"""Row filters (``data.train_filter`` / ``val_filter``) written as text: parsed, checked and
bound to each file's columns.

:class:`RowFilter` is a boolean expression over file and partition columns, e.g.
``dt >= '2026-11-01' and dt < '2026-11-08' and hour < 12`` — the comparisons
``== != < <= > >=``, ``in [...]`` / ``not in``, ``and``, ``or``, ``not`` and parentheses over
column names and literals. It is parsed with Python's own parser into a syntax tree that is
checked node by node and turned into a ``pyarrow.compute`` expression: never evaluated as
Python (:meth:`RowFilter.parse` raises ``ValueError`` naming the key and what is not allowed).

Before it reads a file it is bound to that file's columns (:meth:`RowFilter.bind`): a literal
must be of its column's kind — a number for a numeric column, a string for a string column,
``True`` / ``False`` for a boolean one — or the filter stops (``ValueError``) naming the key,
the column, its type, the literal's and how to write it (``hour is int64 ... write hour ==
7``). A literal is never converted silently ('07' is not 7: as strings ``'07' < '10'``, as
numbers the order differs), with one exception: a string compared with a date or timestamp
column is parsed as that type (ISO text, exact), since the filter has no other way to write a
date. :meth:`RowFilter.keep` gives the indices ``[k]`` (int64) of a table's rows it keeps.

:func:`check_filters` parses a job config's filters at start-up (``ConfigError``).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtl_dist.config import ConfigError, JobConfig
from mtl_dist.data.partitions import INT64_RANGE, INT_TEXT

_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


@dataclass
class RowFilter:
    """A parsed ``data.*_filter``: its text, the ``pyarrow.compute`` expression (unbound:
    literals as written) and the columns it reads. :meth:`bind` checks it against a schema."""

    text: str
    expression: pc.Expression
    columns: frozenset[str]
    key: str = "filter"
    tree: ast.AST | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def parse(text: str, key: str) -> RowFilter:
        """Parse ``text``; ``ValueError`` naming ``key`` and what is not allowed."""
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            raise ValueError(f"{key}: {text!r} is not an expression ({e.msg})") from None
        columns: set[str] = set()
        expr = _Converter(key, text).convert(tree.body, columns)
        return RowFilter(text, expr, frozenset(columns), key, tree.body)

    def bind(
        self, schema: pa.Schema, where: str = "", origins: dict[str, str] | None = None
    ) -> pc.Expression:
        """The expression for rows of ``schema``: every literal checked against its column's
        type (see the module docstring), a string compared with a date / timestamp column
        parsed as that type. ``ValueError`` naming the key, the filter, the column, its type
        and where it comes from (``where``: the file; ``origins``: column → e.g. "a partition
        key of <file>", default "a column of <where>"), the literal's type and how to write
        it."""
        if self.tree is None:
            return self.expression
        binder = _Converter(self.key, self.text, schema, where, origins or {})
        return binder.convert(self.tree, set())

    def keep(self, table: pa.Table, expression: pc.Expression | None = None) -> np.ndarray:
        """Indices ``[k]`` (int64) of the rows of ``table`` the filter keeps (``expression``:
        from :meth:`bind`; default: bound to ``table``'s schema)."""
        expr = self.bind(table.schema) if expression is None else expression
        n = table.num_rows
        marked = table.append_column("__row__", pa.array(np.arange(n, dtype=np.int64)))
        return marked.filter(expr).column("__row__").to_numpy()


def _literal(node: ast.AST, key: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    raise ValueError(f"{key}: {ast.unparse(node)!r} is not a literal (a string or a number)")


def _kind(t: pa.DataType) -> str:
    """A column type's kind for literals: number, string, bool, temporal, null or other."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view":
        return "string"
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return "temporal"
    if pa.types.is_null(t):
        return "null"
    return "other"


def _literal_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "string" if isinstance(value, str) else "number"


_KIND_WORDS = {"number": "a number", "string": "a string", "bool": "a boolean"}


def _rewrite(value, kind: str):
    """``value`` written for a column of ``kind``, when there is one obvious way (else None)."""
    if kind == "number":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            if INT_TEXT.match(text):
                return int(text)
            try:
                return float(text)
            except ValueError:
                return None
    if kind == "string" and not isinstance(value, str):
        return str(value)
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if value in (0, 1):
            return bool(value)
    return None


def _huge(value) -> bool:
    """An integer literal beyond int64 (no Arrow integer holds it)."""
    return isinstance(value, int) and not INT64_RANGE[0] <= value <= INT64_RANGE[1]


def _scalar(value) -> pc.Expression:
    """A literal as an expression; an integer beyond int64 as a float (it orders the same
    against any int64 and equals none)."""
    if isinstance(value, pa.Scalar):
        return pc.scalar(value)
    return pc.scalar(float(value) if _huge(value) else value)


def _const(value) -> ast.AST:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return ast.UnaryOp(ast.USub(), ast.Constant(-value))
    return ast.Constant(value)


class _Converter:
    """Syntax tree → ``pyarrow.compute`` expression; with a ``schema``, literals are checked
    against (and dates parsed as) their columns' types."""

    def __init__(self, key, text, schema=None, where="", origins=None):
        self.key, self.text, self.schema = key, text, schema
        self.where, self.origins = where, origins or {}

    def _type(self, name: str) -> pa.DataType | None:
        if self.schema is None:
            return None
        i = self.schema.get_field_index(name)
        return None if i < 0 else self.schema.field(i).type

    def _fail(self, column: str, t: pa.DataType, problem: str, fix: str) -> ValueError:
        origin = self.origins.get(column) or (f"a column of {self.where}" if self.where else "")
        origin = f" ({origin})" if origin else ""
        return ValueError(f'{self.key} "{self.text}": {column} is {t}{origin} but {problem}; {fix}')

    def _value(self, column: str, t: pa.DataType, value, node: ast.AST, fix) -> object:
        """``value`` checked for column ``column`` of type ``t`` (``fix(v)``: the term with
        ``v`` for ``value``, for the message). Returns the value to compare with."""
        kind, lit = _kind(t), _literal_kind(value)
        if kind in ("null", "other") or kind == lit:
            return value
        if kind == "temporal" and lit == "string":
            try:
                return pa.scalar(value).cast(t)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise self._fail(
                    column,
                    t,
                    f"{value!r} does not parse as {t}",
                    f"write it as ISO text, e.g. {column} >= '2026-11-01'"
                    + (" or '2026-11-01T00:00:00+00:00'" if getattr(t, "tz", None) else ""),
                ) from None
        if kind == "temporal":
            return self._raise(column, t, value, node, fix, "a string in ISO form ('2026-11-01')")
        return self._raise(column, t, value, node, fix, _KIND_WORDS[kind])

    def _raise(self, column, t, value, node, fix, want):
        kind = _kind(t)
        better = _rewrite(value, kind)
        how = f"write {fix(better)}" if better is not None else f"compare it with {want}"
        raise self._fail(
            column, t, f"{ast.unparse(node)} is {_KIND_WORDS[_literal_kind(value)]}", how
        )

    def _operand(self, node: ast.AST, columns: set[str]):
        if isinstance(node, ast.Name):
            columns.add(node.id)
            return pc.field(node.id)
        return _scalar(_literal(node, self.key))

    def _compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST, columns: set[str]):
        sym = _OPS[type(op)]
        a, b = self._operand(left, columns), self._operand(right, columns)
        names = [n for n in (left, right) if isinstance(n, ast.Name)]
        if self.schema is not None and len(names) == 1:
            col_node = names[0]
            lit_node = right if col_node is left else left
            t = self._type(col_node.id)
            if t is not None:

                def fix(v, col_first=col_node is left):
                    pair = (col_node, _const(v)) if col_first else (_const(v), col_node)
                    return ast.unparse(ast.Compare(pair[0], [op], [pair[1]]))

                value = self._value(col_node.id, t, _literal(lit_node, self.key), lit_node, fix)
                s = _scalar(value)
                a, b = (
                    (pc.field(col_node.id), s) if col_node is left else (s, pc.field(col_node.id))
                )
        elif self.schema is not None and len(names) == 2:
            ta, tb = self._type(left.id), self._type(right.id)  # type: ignore[attr-defined]
            if ta is not None and tb is not None:
                ka, kb = _kind(ta), _kind(tb)
                if "other" not in (ka, kb) and "null" not in (ka, kb) and ka != kb:
                    raise ValueError(
                        f'{self.key} "{self.text}": {left.id} is {ta} but {right.id} is {tb}'  # type: ignore[attr-defined]
                        + (f" (in {self.where})" if self.where else "")
                        + "; compare columns of one kind"
                    )
        return {
            "==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b,
        }[sym]  # fmt: skip

    def _isin(self, left: ast.Name, op: ast.cmpop, right: ast.AST, columns: set[str]):
        columns.add(left.id)
        values = [_literal(v, self.key) for v in right.elts]  # type: ignore[attr-defined]
        t = self._type(left.id)
        if t is None:
            kinds = {_literal_kind(v) for v in values}  # unbound: checked when bound
            same = len(kinds) == 1 and not any(_huge(v) for v in values)
            array = pa.array(values if same else [str(v) for v in values])
        else:
            kind, elts = _kind(t), list(right.elts)  # type: ignore[attr-defined]
            for i, v in enumerate(values):  # the suggestion rewrites every literal it can
                better = _rewrite(v, kind) if _literal_kind(v) != kind else None
                if better is not None:
                    elts[i] = _const(better)

            def fix(_value):
                return ast.unparse(ast.Compare(left, [op], [ast.List(elts)]))

            checked = [self._value(left.id, t, v, n, fix) for v, n in zip(values, right.elts)]  # type: ignore[attr-defined]
            array = self._value_set(t, checked)
        term = pc.field(left.id).isin(array)
        return ~term if isinstance(op, ast.NotIn) else term

    @staticmethod
    def _value_set(t: pa.DataType, values: list) -> pa.Array:
        """The ``in`` list as an array of the column's type (values it cannot hold exactly
        cannot match, so they are left out: ``isin`` would otherwise cast them)."""
        vt = t.value_type if pa.types.is_dictionary(t) else t
        if pa.types.is_integer(vt):
            info = np.iinfo(vt.to_pandas_dtype())
            ints = [
                int(v)
                for v in values
                if math.isfinite(v) and float(v) == int(v) and info.min <= v <= info.max
            ]
            return pa.array(ints, vt)
        if any(isinstance(v, pa.Scalar) for v in values):
            return pa.array([v.as_py() if isinstance(v, pa.Scalar) else v for v in values], vt)
        if _kind(vt) == "number" and pa.types.is_floating(vt):
            return pa.array([float(v) for v in values], pa.float64())
        return pa.array(values)

    def convert(self, node: ast.AST, columns: set[str]) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [self.convert(v, columns) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.convert(node.operand, columns)
        if isinstance(node, ast.Compare):
            out, left = None, node.left
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(left, ast.Name) or not isinstance(
                        right, (ast.List, ast.Tuple)
                    ):
                        raise ValueError(
                            f"{self.key}: 'in' takes a column and a list, e.g. dt in ['a', 'b']"
                        )
                    term = self._isin(left, op, right, columns)
                elif type(op) in _OPS:
                    term = self._compare(left, op, right, columns)
                else:
                    raise ValueError(f"{self.key}: operator {type(op).__name__} is not allowed")
                out = term if out is None else out & term
                left = right
            return out
        raise ValueError(
            f"{self.key}: {ast.unparse(node)!r} is not allowed (comparisons of columns and "
            "literals joined by and / or / not)"
        )


def check_filters(cfg: JobConfig) -> JobConfig:
    """``cfg`` once ``data.train_filter`` and ``data.val_filter`` parse (see
    :meth:`RowFilter.parse`); ``ConfigError`` naming the key and what is not allowed. The
    config package checks every other key; filters need this stage's parser, so every entry
    point that loads a job config calls this right after :func:`mtl_dist.config.load_config`."""
    for key in ("train_filter", "val_filter"):
        text = getattr(cfg.data, key)
        if text:
            try:
                RowFilter.parse(text, f"data.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return cfg

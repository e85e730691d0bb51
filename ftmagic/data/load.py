"""Read a dataset from wherever it is into a list of plain dicts, remembering where each came from.

Accepted: a path to JSONL, JSON, CSV/TSV or Parquet; a folder written by
``datasets.Dataset.save_to_disk``; a ``datasets.Dataset``/``DatasetDict``; a pandas
DataFrame; a list of dicts; or a Hugging Face dataset id (through ``datasets.load_dataset``).

``strict=True`` (training) raises :class:`~ftmagic.errors.DataError` on the first line
that cannot be read, naming ``file:line`` and what is wrong. ``strict=False`` (the
previewer) keeps going and collects a :class:`~ftmagic.data.problems.Problem` per bad
line, so nothing is dropped without being counted.

Example::

    loaded = load_data("train.jsonl")           # strict
    loaded.records[0], loaded.location(0)       # ({'text': ...}, 'train.jsonl:1')
    loose = load_data("train.jsonl", strict=False)
    [str(p) for p in loose.problems]            # ['train.jsonl:7: not valid JSON (...)']
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ftmagic.data.formats import MAX_RECORD_CHARS
from ftmagic.data.problems import Problem, RecordError
from ftmagic.errors import DataError, a_type

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".json": "json", ".csv": "csv",
              ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
# Nesting levels of one JSON record: real records use a handful (messages, tool calls, arguments);
# far deeper values only exhaust Python's recursion wherever they are read later.
MAX_JSON_DEPTH = 64
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedData:
    """Records read from one source, with what is needed to name each record's location."""

    records: list
    name: str  # file path, or "data" for in-memory objects
    unit: str = "index"  # "line": lines[i] is a file line; "row": a table's row (Parquet, DataFrame, datasets); "index": data[i]
    # For "line": the file line of each record; for "row"/"index": the original position (None: same as i).
    lines: Optional[list] = None
    problems: list = field(default_factory=list)
    read: int = 0  # lines or rows read, including those that could not be parsed

    def location(self, i: int) -> str:
        """Where record ``i`` came from, e.g. ``train.jsonl:12``, ``x.parquet[11]`` or ``data[11]``.

        A file line counts from 1, as editors do; a table's row or a list's item is its index, from 0,
        as ``df.iloc[11]``, ``dataset[11]`` and ``records[11]`` count (the brackets say so, where
        "row 0" beside "line 1" read as a count off by one).
        """
        if self.unit == "line":
            return f"{self.name}:{self.lines[i]}"
        original = self.lines[i] if self.lines is not None else i  # rows that were not dicts are not in `records`
        return f"{self.name}[{original}]"

    def problem(self, i: int, error: "RecordError") -> Problem:
        """``error`` of record ``i`` as a :class:`Problem` at its location, in the words for this kind of source."""
        return Problem(error.kind, self.location(i), error.message_for(self.unit))


def load_data(data: Any, *, strict: bool = True, split: str = "train", subset: Optional[str] = None,
              key: str = "data") -> LoadedData:
    """Load ``data`` (path, Hub id, Dataset, DataFrame or list of dicts) into a :class:`LoadedData`.

    ``split`` picks a split of a dataset that has several; ``subset`` is a Hub dataset's
    configuration name (``load_dataset(name, subset)``). ``key``: the argument or config key
    ``data`` was given as, named when it is not a dataset at all.

    Example::

        load_data([{"text": "hello"}]).records      # [{'text': 'hello'}]
        load_data("data.csv").location(0)           # 'data.csv:2' (line 1 is the header)
    """
    if isinstance(data, LoadedData):
        return data
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        return _load_path(os.path.expanduser(data), strict=strict, split=split, subset=subset)
    kind = type(data).__module__.split(".")[0] + "." + type(data).__name__
    if isinstance(data, dict) and not kind.startswith("datasets."):
        raise DataError(f"{key}: a single dict is not a dataset; pass a list of dicts, e.g. [{{\"text\": ...}}]")
    if kind.startswith("pandas.") and hasattr(data, "to_dict"):
        return _from_rows([_plain(r) for r in data.to_dict("records")], "data", "row", strict)
    if kind.startswith("datasets."):
        return _from_hf(data, "data", split, strict)
    if isinstance(data, (list, tuple)):
        return _from_rows(list(data), "data", "index", strict)
    raise DataError(f"{key}: {a_type(data)} is not a dataset; pass a file path, a Hugging Face dataset id, "
                    "a list of dicts, a pandas DataFrame or a datasets.Dataset")


# --------------------------------------------------------------------------- paths


def _load_path(path: str, *, strict: bool, split: str, subset: Optional[str] = None) -> LoadedData:
    if os.path.isdir(path):
        return _load_folder(path, split, strict)
    if not os.path.exists(path):
        ext = os.path.splitext(path)[1].lower()
        if ext in EXTENSIONS or path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
            # Relative paths are read from the current folder, not the config file's: say which it was.
            where = "" if os.path.isabs(path) else f" (relative paths are read from the current folder, {os.getcwd()})"
            raise DataError(f"{path}: file not found{where}")
        return _load_hub(path, split, strict, subset)
    ext = os.path.splitext(path)[1].lower()
    kind = EXTENSIONS.get(ext) or _sniff(path)
    if kind == "parquet":
        return _load_parquet(path, strict)
    text, bad_lines = _read_text(path, strict)
    if kind == "jsonl":
        loaded = _parse_jsonl(text, path, strict)
    elif kind == "json":
        loaded = _parse_json(text, path, strict)
    else:
        loaded = _parse_csv(text, path, strict, delimiter="\t" if kind == "tsv" else ",")
    for line, column in bad_lines:
        loaded.problems.append(Problem("non_utf8", f"{path}:{line}", f"bytes that are not UTF-8 at column {column} "
                                       "(replaced by \ufffd; save the file as UTF-8)"))
    loaded.problems.sort(key=lambda p: _line_of(p.location))
    return loaded


def _sniff(path: str) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    raise DataError(f"{path}: unknown file type `{os.path.splitext(path)[1] or '(none)'}`; use .jsonl, .json, .csv, "
                    ".tsv or .parquet, or a folder saved with Dataset.save_to_disk")


def _read_text(path: str, strict: bool) -> tuple[str, list]:
    """The file as text; bytes that are not UTF-8 raise (strict) or are replaced and reported."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError:
        pass
    lines, bad = [], []
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if strict:
                raise DataError(f"{path}:{number}: bytes that are not UTF-8 at column {exc.start + 1}; "
                                "save the file as UTF-8") from None
            bad.append((number, exc.start + 1))
            lines.append(chunk.decode("utf-8", errors="replace"))
    return "\n".join(lines), bad


def _parse_jsonl(text: str, path: str, strict: bool) -> LoadedData:
    out = LoadedData([], path, "line", [])
    fast = _fast_json_loads()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line or line.isspace():
            continue
        out.read += 1
        if len(line) > MAX_RECORD_CHARS:
            # Checked before parsing: a 200 MB line would cost gigabytes in the tokenizer.
            _fail(out, strict, "oversized", f"{path}:{number}", _oversized(len(line)))
            continue
        try:
            try:
                value = fast(line)
            except ValueError:  # re-parse with json for the standard message (and its NaN/big-int leniency)
                value = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(out, strict, "unparseable", f"{path}:{number}",
                  f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object")
            continue
        except (ValueError, RecursionError) as exc:
            _fail(out, strict, "unparseable", f"{path}:{number}", _unreadable_json(exc))
            continue
        if line.count("[") + line.count("{") > MAX_JSON_DEPTH and _too_deep(value):
            _fail(out, strict, "unparseable", f"{path}:{number}", _unreadable_json(RecursionError()))
            continue
        if not isinstance(value, dict):
            _fail(out, strict, "not_a_record", f"{path}:{number}",
                  f"the line is a JSON {_json_type(value)}, expected an object like {{\"text\": \"...\"}}")
            continue
        out.records.append(value)
        out.lines.append(number)
    return out


def _fast_json_loads():
    """orjson.loads when installed (several times faster on large files), else json.loads."""
    try:
        import orjson

        return orjson.loads
    except ImportError:
        return json.loads


def _parse_json(text: str, path: str, strict: bool) -> LoadedData:
    stripped = text.lstrip()
    if not stripped:
        return LoadedData([], path, "line", [])
    if stripped[0] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # several objects, one per line: it is JSONL named .json
                return _parse_jsonl(text, path, strict)
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}: {_unreadable_json(exc)}") from None
        lists = [k for k, v in value.items() if isinstance(v, list)] if isinstance(value, dict) else []
        if len(lists) != 1:
            raise DataError(f"{path}:1: expected a JSON list of objects (or an object holding one list), "
                            f"found a JSON {_json_type(value)}")
        return _from_rows(value[lists[0]], f"{path}:{lists[0]}", "index", strict)
    return _scan_json_array(text, path, strict)


def _scan_json_array(text: str, path: str, strict: bool) -> LoadedData:
    """Decode a top-level JSON list element by element, so each record knows its line."""
    import bisect

    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_at(pos: int) -> int:
        return bisect.bisect_right(newlines, pos - 1) + 1

    decoder = json.JSONDecoder()
    out = LoadedData([], path, "line", [])
    ws = re.compile(r"[ \t\r\n]*")
    pos = ws.match(text, 0).end() + 1  # after "["
    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return out
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            _fail(out, strict, "unparseable", f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg} at column {exc.colno})")
            return out  # the rest of a broken array cannot be located reliably
        except (ValueError, RecursionError) as exc:
            _fail(out, strict, "unparseable", f"{path}:{line_at(pos)}", _unreadable_json(exc))
            return out
        out.read += 1
        if end - pos > MAX_RECORD_CHARS:
            _fail(out, strict, "oversized", f"{path}:{line_at(pos)}", _oversized(end - pos))
        elif text.count("[", pos, end) + text.count("{", pos, end) > MAX_JSON_DEPTH and _too_deep(value):
            _fail(out, strict, "unparseable", f"{path}:{line_at(pos)}", _unreadable_json(RecursionError()))
        elif isinstance(value, dict):
            out.records.append(value)
            out.lines.append(line_at(pos))
        else:
            _fail(out, strict, "not_a_record", f"{path}:{line_at(pos)}",
                  f"the list element is a JSON {_json_type(value)}, expected an object")
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            return out
        _fail(out, strict, "unparseable", f"{path}:{line_at(pos)}", "not valid JSON (expected `,` or `]` after an element)")
        return out


def _parse_csv(text: str, path: str, strict: bool, delimiter: str) -> LoadedData:
    out = LoadedData([], path, "line", [])
    # Long documents in one cell are normal for training data (the csv default caps cells at
    # 128 KiB); one record's limit applies instead.
    csv.field_size_limit(MAX_RECORD_CHARS)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return out
    except csv.Error as exc:
        raise DataError(f"{path}:1: cannot parse the header ({exc})") from None
    if not any(h.strip() for h in header):
        raise DataError(f"{path}:1: the first line must name the columns, e.g. `prompt,completion`")
    previous_end = reader.line_num
    while True:
        start = previous_end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                _fail(out, strict, "oversized", f"{path}:{start}", _oversized(None, "a field has"))
            else:
                _fail(out, strict, "unparseable", f"{path}:{reader.line_num}", f"cannot parse the row ({exc})")
            previous_end = reader.line_num
            continue
        previous_end = reader.line_num
        if not row:
            continue
        out.read += 1
        if len(row) != len(header):
            _fail(out, strict, "unparseable", f"{path}:{start}", f"the row has {len(row)} fields but the header has "
                  f"{len(header)} (quote fields that contain `{delimiter if delimiter != chr(9) else 'tab'}`)")
            continue
        out.records.append(dict(zip(header, row)))
        out.lines.append(start)
    return out


def _load_parquet(path: str, strict: bool) -> LoadedData:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`)") from None
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as Parquet ({_first_line(exc)})") from None
    return _from_rows(rows, path, "row", strict)


def _load_folder(path: str, split: str, strict: bool) -> LoadedData:
    marker = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if not marker:
        raise DataError(f"{path}: the folder is not a saved `datasets` dataset (no dataset_info.json); "
                        "pass a data file or a folder written by Dataset.save_to_disk")
    try:
        import datasets

        obj = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot load the saved dataset ({_first_line(exc)})") from None
    return _from_hf(obj, path, split, strict)


def _load_hub(name: str, split: str, strict: bool, subset: Optional[str] = None) -> LoadedData:
    from ftmagic.hub import hub_access

    try:
        import datasets

        with hub_access(name, kind="dataset", error=DataError):
            obj = datasets.load_dataset(name, split=split) if subset is None else datasets.load_dataset(name, subset,
                                                                                                        split=split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{name}: not a local file, and loading it as a Hugging Face dataset failed "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    return _from_hf(obj, name, split, strict)


def _from_hf(obj: Any, name: str, split: str, strict: bool) -> LoadedData:
    if hasattr(obj, "keys") and not hasattr(obj, "column_names") or type(obj).__name__.endswith("DatasetDict"):
        splits = list(obj.keys())
        if split in splits:
            obj = obj[split]
        elif len(splits) == 1:
            obj = obj[splits[0]]
        else:
            raise DataError(f"{name}: has splits {', '.join(splits)} but no `{split}`; pick one, e.g. dataset['{splits[0]}']")
    rows = obj.to_list() if hasattr(obj, "to_list") else [dict(r) for r in obj]
    return _from_rows(rows, name, "row", strict)


def _from_rows(rows: list, name: str, unit: str, strict: bool) -> LoadedData:
    out = LoadedData([], name, unit, None)
    out.read = len(rows)
    keep_index = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            out.records.append(row)
            keep_index.append(i)
        else:
            where = f"{name}[{i}]"
            _fail(out, strict, "not_a_record", where, f"is {a_type(row)}, expected a dict like {{\"text\": \"...\"}}")
    if len(keep_index) != len(rows):
        out.lines = keep_index  # locations keep pointing at the original rows
    return out


# --------------------------------------------------------------------------- helpers


def _fail(out: LoadedData, strict: bool, kind: str, where: str, message: str) -> None:
    if strict:
        raise DataError(f"{where}: {message}")
    out.problems.append(Problem(kind, where, message))


def _plain(value: Any) -> Any:
    """pandas/numpy cells as plain Python (NaN -> None, arrays -> lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _oversized(size: Optional[int], what: str = "the line has") -> str:
    shown = f" ({size:,})" if size is not None else ""
    return (f"{what} more than {MAX_RECORD_CHARS:,} characters{shown}, over the limit for one record; "
            "split it into several records")


def _too_deep(value: Any, limit: Optional[int] = None) -> bool:
    """Whether ``value`` nests lists and objects deeper than ``limit`` (iterative: no recursion to run out of)."""
    limit = MAX_JSON_DEPTH if limit is None else limit
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


def _unreadable_json(exc: BaseException) -> str:
    if isinstance(exc, RecursionError) or "recursion" in str(exc).lower():
        return f"JSON nested more than {MAX_JSON_DEPTH} levels deep; a record needs only a few"
    return f"not readable JSON ({str(exc).splitlines()[0][:100]})"


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", dict: "object"}.get(
        type(value), "null" if value is None else type(value).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _line_of(location: str) -> int:
    tail = location.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0

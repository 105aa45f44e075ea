"""Prometheus text (0.0.4) and OpenMetrics exposition, written straight from samples.

The hot part of a scrape: thousands of task flows times their histogram buckets.
What makes it fast (benchmarks/scrape.py measures it):
- a series' escaped label set is built once and kept between scrapes (``LabelCache``);
- a histogram is one join of its label text into segments made once per family
  and bucket layout, and one %-format of its counts from ``itertools.accumulate``;
- the task flows come as ``Column`` samples: one per family, all flows at once,
  their label texts looked up once for the six counters and two histograms.
"""
from __future__ import annotations

import math
from itertools import accumulate


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


def _number(value) -> str:
    if type(value) is int:  # noqa: E721 - bool must not pass as a count
        return str(value)
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


class LabelCache:
    """Escaped ``k="v",...`` strings of the series seen recently, per label-name tuple.

    Label sets of task flows live as long as their worker: escaping and joining
    them again at every scrape was a third of the render. Bounded: when it holds
    far more series than the last scrape used (workers purged, names folded), it
    starts over.
    """

    def __init__(self, static_labels: dict):
        self.static = ",".join(f'{k}="{_escape_label(v)}"' for k, v in static_labels.items())
        self._by_names: dict[tuple, dict[tuple, str]] = {}
        self.columns: dict[str, tuple[list, str]] = {}  # see _counter_column
        self._size = 0

    def table(self, names: tuple) -> dict[tuple, str]:
        """The label sets of one label-name tuple: look up there, ``add`` on a miss."""
        table = self._by_names.get(names)
        if table is None:
            table = self._by_names[names] = {}
        return table

    def add(self, table: dict, names: tuple, values: tuple) -> str:
        parts = [self.static] if self.static else []
        parts.extend(f'{key}="{_escape_label(value)}"' for key, value in zip(names, values))
        text = table[values] = ",".join(parts)
        self._size += 1
        return text

    def end_scrape(self, used: int) -> None:
        """``used``: how many series the scrape rendered."""
        if self._size > 2 * used + 1000:
            self._by_names.clear()
            self.columns.clear()
            self._size = 0


class Column:
    """Many series of one family as one sample ``(definition, None, Column)``.

    ``labels``: a list of label-value tuples, which the columns of several families
    may share (looked up once per scrape); ``values``: theirs, in the same order.
    """

    __slots__ = ("labels", "values")

    def __init__(self, labels: list, values: list):
        self.labels = labels
        self.values = values


def expand_columns(samples):
    """The same samples with every Column split into one sample per series."""
    for definition, label_values, value in samples:
        if label_values is None:
            for series_labels, series_value in zip(value.labels, value.values):
                yield definition, series_labels, series_value
        else:
            yield definition, label_values, value


def _histogram_segments(name: str, bounds: tuple, labelled: bool) -> list[str]:
    """The text of one histogram series around its label text: ``labels.join(segments)``
    is a %-template of the cumulative bucket counts, the +Inf count again (as _count)
    and the sum. Joining and one %-format are C-level, about twice as fast as formatting
    the 20 lines of a series one by one."""
    if not labelled:
        lines = [f'{name}_bucket{{le="{float(bound)!r}"}} %d' for bound in bounds]
        lines += [f'{name}_bucket{{le="+Inf"}} %d', f"{name}_count %d", f"{name}_sum %s"]
        return ["\n".join(lines)]
    segments = [f"{name}_bucket{{"]
    segments += [f',le="{float(bound)!r}"}} %d\n{name}_bucket{{' for bound in bounds]
    segments += [f',le="+Inf"}} %d\n{name}_count{{', f"}} %d\n{name}_sum{{", "} %s"]
    return segments


def _histogram(templates: dict, name: str, labels: str, histogram) -> str:
    key = (name, histogram.bounds, bool(labels))
    segments = templates.get(key)
    if segments is None:
        segments = templates[key] = _histogram_segments(name, histogram.bounds, bool(labels))
    counts = list(accumulate(histogram.counts))
    counts += (counts[-1], _number(histogram.sum))
    if "%" in labels:  # the label text becomes part of the template
        labels = labels.replace("%", "%%")
    return labels.join(segments) % tuple(counts)


def _counter_column(cache: "LabelCache", name: str, column: Column, texts: list) -> str:
    """All lines of a counter column. The series of a busy cluster change their values,
    rarely their label sets: the lines are kept as one %-template per family until
    the label list differs, and a scrape is one C-level format of the values."""
    values = column.values
    if set(map(type, values)) != {int}:  # %d is for counts only (and not bools)
        return "\n".join(f"{name}_total{{{text}}} {_number(v)}" for text, v in zip(texts, values))
    hit = cache.columns.get(name)
    if hit is None or hit[0] != column.labels:  # same tuples in the same order: an identity walk
        template = "\n".join(f"{name}_total{{{text.replace('%', '%%')}}} %d" for text in texts)
        hit = cache.columns[name] = (column.labels, template)
    return hit[1] % tuple(values)


def _column_texts(cache: LabelCache, names: tuple, labels: list, seen: dict) -> list:
    """Label texts of a column's series; a label list shared by several columns is looked up once."""
    hit = seen.get(id(labels))
    if hit is not None and hit[0] is labels:
        return hit[1]
    table = cache.table(names)
    texts = [table.get(values) or cache.add(table, names, values) for values in labels]
    seen[id(labels)] = (labels, texts)  # holding the list keeps its id from being reused
    return texts


def render_families(samples, prefix: str, static_labels: dict, openmetrics: bool,
                    labels: LabelCache | None = None) -> str:
    """``samples``: (MetricDef, label values, value) in any order; families come out
    in first-seen order, each with its HELP and TYPE."""
    cache = labels if labels is not None else LabelCache(static_labels)
    templates: dict[tuple, str] = {}
    families: dict = {}  # by id: a dataclass hash walks every field, at every sample
    current = None
    used = 0
    # The loop below runs once per series (hundreds of thousands at scale): what is
    # the same as the previous sample's (family, label table) is not looked up again.
    column_texts: dict[int, tuple[list, list]] = {}

    def family_of(definition) -> tuple:
        family = families.get(id(definition))
        if family is None:
            family = families[id(definition)] = (definition, prefix + definition.name, definition.kind, [])
        return family

    for definition, label_values, value in samples:
        if label_values is None:  # a Column: write it here, in comprehensions
            if not value.labels:
                continue  # no series: no family (prometheus_client writes none either)
            current = None
            _, name, kind, lines = family_of(definition)
            texts = _column_texts(cache, definition.labels, value.labels, column_texts)
            used += len(texts)
            if kind == "counter":
                lines.append(_counter_column(cache, name, value, texts))
            elif kind == "histogram":
                lines.extend([_histogram(templates, name, text, h) for text, h in zip(texts, value.values)])
            else:
                lines.extend([f"{name}{{{text}}} {_number(v)}" for text, v in zip(texts, value.values)])
            continue
        if definition is not current:
            current = definition
            _, name, kind, lines = family_of(definition)
            labelled = bool(definition.labels or cache.static)
            table = cache.table(definition.labels)
        used += 1
        if labelled:
            if type(label_values) is not tuple:  # noqa: E721 - the cache key must be hashable
                label_values = tuple(label_values)
            text = table.get(label_values) or cache.add(table, definition.labels, label_values)
        else:
            text = ""
        if kind == "counter":
            number = str(value) if type(value) is int else _number(value)  # noqa: E721
            lines.append(f"{name}_total{{{text}}} {number}" if text else f"{name}_total {number}")
        elif kind == "histogram":
            lines.append(_histogram(templates, name, text, value))
        else:
            lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    cache.end_scrape(used)
    out = []
    for definition, name, kind, lines in families.values():
        header = name + "_total" if kind == "counter" and not openmetrics else name
        out.append(f"# HELP {header} {_escape_help(definition.help, openmetrics)}")
        out.append(f"# TYPE {header} {kind}")
        out.extend(lines)
    if out:
        out.append("")  # the final newline, without copying the whole text once more
    return "\n".join(out)

"""Prometheus text (0.0.4) and OpenMetrics exposition, written straight from samples.

The hot part of a scrape: thousands of task flows times their histogram buckets.
What makes it fast (benchmarks/scrape.py measures it):
- a series' escaped label set is built once and kept between scrapes (``LabelCache``);
- a histogram is one join of its label text into segments made once per family
  and bucket layout, and one %-format of its counts from ``itertools.accumulate``;
- the task flows come as ``Column`` samples: one per family, all flows at once,
  their label texts looked up once for the six counters and two histograms.

No sample is ever NaN or ±Inf (a histogram's ``le="+Inf"`` aside). The model
cannot hold such a value (every number from outside goes through the readers of
``state.events``); should one get there anyway, this is the last line: the
sample (for a histogram, the whole series) is left out and ``on_dropped`` is
called with its family's name (``celery_exporter_nonfinite_samples_dropped_total``).
"""
from __future__ import annotations

import math
from itertools import accumulate


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


# A Python int from here on is read as ±Inf by Prometheus (beyond the float64 range).
_INT_LIMIT = 2 ** 1024


def _number(value) -> str | None:
    """A sample value as text; None when it is not a finite number (the sample is dropped)."""
    if type(value) is int:  # noqa: E721 - bool must not pass as a count
        return str(value) if -_INT_LIMIT < value < _INT_LIMIT else None
    value = float(value)
    return repr(value) if math.isfinite(value) else None


def _ignore_dropped(family: str) -> None:
    pass


def finite_value(kind: str, value) -> bool:
    """Whether a sample (a histogram: its sum) can be served (for paths other than render_families)."""
    return _number(value.sum if kind == "histogram" else value) is not None


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


def _histogram(templates: dict, name: str, labels: str, histogram) -> str | None:
    """The series' text; None when its sum is not finite (the series is dropped)."""
    total = _number(histogram.sum)
    if total is None:
        return None
    key = (name, histogram.bounds, bool(labels))
    segments = templates.get(key)
    if segments is None:
        segments = templates[key] = _histogram_segments(name, histogram.bounds, bool(labels))
    counts = list(accumulate(histogram.counts))
    counts += (counts[-1], total)
    if "%" in labels:  # the label text becomes part of the template
        labels = labels.replace("%", "%%")
    return labels.join(segments) % tuple(counts)


def _counter_column(cache: "LabelCache", name: str, column: Column, texts: list, dropped) -> str:
    """All lines of a counter column. The series of a busy cluster change their values,
    rarely their label sets: the lines are kept as one %-template per family until
    the label list differs, and a scrape is one C-level format of the values."""
    values = column.values
    # %d is for counts only (and not bools), within the float range
    if set(map(type, values)) != {int} or not -_INT_LIMIT < min(values) <= max(values) < _INT_LIMIT:
        return "\n".join(_lines(f"{name}_total", texts, values, dropped, name))
    hit = cache.columns.get(name)
    if hit is None or hit[0] != column.labels:  # same tuples in the same order: an identity walk
        template = "\n".join(f"{name}_total{{{text.replace('%', '%%')}}} %d" for text in texts)
        hit = cache.columns[name] = (column.labels, template)
    return hit[1] % tuple(values)


def _lines(metric: str, texts: list, values: list, dropped, family: str) -> list[str]:
    """``metric{labels} value`` lines of a column; a non-finite value's line is left out."""
    numbers = [_number(v) for v in values]
    if None not in numbers:
        return [f"{metric}{{{text}}} {n}" for text, n in zip(texts, numbers)]
    lines = []
    for text, n in zip(texts, numbers):
        if n is None:
            dropped(family)
        else:
            lines.append(f"{metric}{{{text}}} {n}")
    return lines


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
                    labels: LabelCache | None = None, on_dropped=None) -> str:
    """``samples``: (MetricDef, label values, value) in any order; families come out
    in first-seen order, each with its HELP and TYPE. ``on_dropped(family name)``:
    called for each sample left out because its value is not finite."""
    cache = labels if labels is not None else LabelCache(static_labels)
    dropped = on_dropped or _ignore_dropped
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
            family = families[id(definition)] = (definition, definition.family_name(prefix), definition.kind, [])
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
                lines.append(_counter_column(cache, name, value, texts, dropped))
            elif kind == "histogram":
                series = [_histogram(templates, name, text, h) for text, h in zip(texts, value.values)]
                if None in series:
                    for _ in range(series.count(None)):
                        dropped(name)
                    series = [text for text in series if text is not None]
                lines.extend(series)
            else:
                lines.extend(_lines(name, texts, value.values, dropped, name))
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
        if kind == "histogram":
            series = _histogram(templates, name, text, value)
            if series is None:
                dropped(name)
            else:
                lines.append(series)
            continue
        number = _number(value)
        if number is None:
            dropped(name)
        elif kind == "counter":
            lines.append(f"{name}_total{{{text}}} {number}" if text else f"{name}_total {number}")
        else:
            lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")
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

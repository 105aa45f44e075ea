"""Prometheus text (0.0.4) and OpenMetrics exposition, written straight from samples.

The hot part of a scrape: thousands of task flows times their histogram buckets.
Label sets are escaped once and reused for every line of a sample.
"""
from __future__ import annotations

import math


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


def render_families(samples, prefix: str, static_labels: dict, openmetrics: bool) -> str:
    """``samples``: (MetricDef, label values, value) in any order; families come out
    in first-seen order, each with its HELP and TYPE."""
    static = ",".join(f'{k}="{_escape_label(v)}"' for k, v in static_labels.items())
    escaped: dict[str, str] = {}
    families: dict = {}
    for definition, label_values, value in samples:
        lines = families.get(definition)
        if lines is None:
            lines = families[definition] = []
        parts = [static] if static else []
        for key, label in zip(definition.labels, label_values):
            text = escaped.get(label)
            if text is None:
                text = escaped[label] = _escape_label(label)
            parts.append(f'{key}="{text}"')
        labels = ",".join(parts)
        name = prefix + definition.name
        if definition.kind == "counter":
            lines.append(f"{name}_total{{{labels}}} {_number(value)}" if labels else
                         f"{name}_total {_number(value)}")
        elif definition.kind == "histogram":
            bucket = f"{name}_bucket{{{labels}," if labels else f"{name}_bucket{{"
            for le, count in value.cumulative():
                lines.append(f'{bucket}le="{le}"}} {count}')
            suffix = f"{{{labels}}}" if labels else ""
            lines.append(f"{name}_count{suffix} {value.count}")
            lines.append(f"{name}_sum{suffix} {_number(value.sum)}")
        else:
            lines.append(f"{name}{{{labels}}} {_number(value)}" if labels else f"{name} {_number(value)}")
    out = []
    for definition, lines in families.items():
        name = prefix + definition.name
        header = name + "_total" if definition.kind == "counter" and not openmetrics else name
        out.append(f"# HELP {header} {_escape_help(definition.help, openmetrics)}")
        out.append(f"# TYPE {header} {definition.kind}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""

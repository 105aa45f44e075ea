"""Every manifest the chart renders, with the default values and with every option on, checked
against the schemas a cluster would check it against:

- built-in kinds against Kubernetes' own OpenAPI schemas (the `kubernetes-validate` package ships
  them per minor version), in strict mode (unknown fields are errors, as with kubectl's default
  --validate=strict), for the OLDEST and the NEWEST Kubernetes the chart supports. The oldest is
  the lower bound of Chart.yaml's `kubeVersion` (the one source of truth), the newest is the
  newest minor kubernetes-validate ships (the chart declares no upper bound);
- the Prometheus Operator's ServiceMonitor and PrometheusRule against the openAPIV3Schema of
  their CRDs, vendored in tests/deploy/schemas/ (see its README.md), with `jsonschema`;
- and the API server's own rules that no OpenAPI schema carries: object names, label and
  annotation keys and values, ConfigMap keys and size.

A problem reads "<Kind>/<name> (<source>): <path>: <reason>".
"""
from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from .test_helm_chart import (  # noqa: F401  (all_on_values is a fixture)
    KUBE_VERSIONS, _minor, all_on_values, kv, render, shipped_kube_versions)

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
CRD_FILES = ("monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def test_kube_version_range_agrees_with_the_schemas_we_have():
    oldest, newest = KUBE_VERSIONS
    shipped = shipped_kube_versions()
    assert oldest in shipped, (
        f"Chart.yaml says kubeVersion >= {oldest}, but kubernetes-validate {kv.__version__} ships schemas only "
        f"for {shipped[0]}..{shipped[-1]}: the oldest version the chart claims could not be checked")
    assert _minor(oldest) < _minor(newest)


# --------------------------------------------------- CRD schemas (vendored) ---
def _openapi_to_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 structural schema (a CRD's openAPIV3Schema) as a JSON schema that rejects
    unknown fields like the API server with strict field validation."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if k not in ("description", "default")}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "pattern" in out and "(?i)" in out["pattern"][1:]:
        # Go's RE2 takes a flag group anywhere; Python only at the very start
        out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: the API server rejects duplicate keys of a map list, duplicate set items."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            key = tuple(repr(item.get(k)) for k in keys) if isinstance(item, dict) else repr(item)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry with {dict(zip(keys, key))} (list-type map)")
            seen.add(key)
    elif list_type == "set" and len({repr(i) for i in instance}) != len(instance):
        yield jsonschema.ValidationError("duplicate items (list-type set)")


CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@lru_cache(maxsize=None)
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, for every served version of every vendored CRD."""
    validators = {}
    for name in CRD_FILES:
        crd = yaml.safe_load((SCHEMAS_DIR / name).read_text())
        assert crd["kind"] == "CustomResourceDefinition", name
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = _openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            CrdValidator.check_schema(schema)
            api_version = f"{crd['spec']['group']}/{version['name']}"
            validators[(api_version, crd["spec"]["names"]["kind"])] = CrdValidator(schema)
    return validators


# ---------------------------------------- API-server rules outside OpenAPI ---
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
CONFIGMAP_KEY = r"[-._a-zA-Z0-9]+"
CONFIGMAP_MAX_BYTES = 1024 * 1024  # etcd's object limit as the API server applies it to ConfigMap data
ANNOTATIONS_MAX_BYTES = 256 * 1024


def _qualified_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not re.fullmatch(DNS1123_SUBDOMAIN, prefix)):
        return f"key {key!r}: prefix must be a DNS subdomain"
    if len(name) > 63 or not re.fullmatch(QUALIFIED_NAME, name):
        return f"key {key!r}: name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
    return None


def _meta_problems(meta: dict, kind: str, where: str) -> Iterator[tuple[str, str]]:
    if "name" in meta:
        name = meta["name"]
        if kind == "Service":
            if len(name) > 63 or not re.fullmatch(DNS1035_LABEL, name):
                yield f"{where}.name", f"{name!r}: a Service name must be a DNS-1035 label (a-z first, at most 63)"
        elif len(name) > 253 or not re.fullmatch(DNS1123_SUBDOMAIN, name):
            yield f"{where}.name", f"{name!r}: must be a DNS-1123 subdomain (at most 253)"
    if "namespace" in meta and (len(meta["namespace"]) > 63 or not re.fullmatch(DNS1123_LABEL, meta["namespace"])):
        yield f"{where}.namespace", f"{meta['namespace']!r}: must be a DNS-1123 label"
    for key, value in (meta.get("labels") or {}).items():
        if problem := _qualified_key_problem(key):
            yield f"{where}.labels", problem
        if not isinstance(value, str) or len(value) > 63 or (value and not re.fullmatch(QUALIFIED_NAME, value)):
            yield f"{where}.labels.{key}", f"value {value!r} is not a valid label value (at most 63, alphanumeric ends)"
    annotations = meta.get("annotations") or {}
    for key in annotations:
        if problem := _qualified_key_problem(key):
            yield f"{where}.annotations", problem
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > ANNOTATIONS_MAX_BYTES:
        yield f"{where}.annotations", "more than 256 KiB of annotations"


def apiserver_problems(doc: dict) -> Iterator[tuple[str, str]]:
    kind = doc["kind"]
    yield from _meta_problems(doc.get("metadata") or {}, kind, "metadata")
    template = (doc.get("spec") or {}).get("template")
    if isinstance(template, dict):
        yield from _meta_problems(template.get("metadata") or {}, "Pod", "spec.template.metadata")
    if kind in ("ConfigMap", "Secret"):
        data = {**(doc.get("data") or {}), **(doc.get("binaryData") or {})}
        for key in data:
            if len(key) > 253 or not re.fullmatch(CONFIGMAP_KEY, key):
                yield f"data.{key}", "a data key must consist of alphanumerics, '-', '_' or '.'"
        if sum(len(k) + len(str(v).encode()) for k, v in data.items()) > CONFIGMAP_MAX_BYTES:
            yield "data", f"{kind} data exceeds 1 MiB"


# ------------------------------------------------------------- the check ---
def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def manifest_problems(doc: dict, kube_version: str) -> list[str]:
    """Every reason the API server of `kube_version` would refuse `doc`, as readable lines."""
    ident = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    problems = []
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crd_validators():
        errors = sorted(crd_validators()[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        problems += [f"{ident} (CRD schema {key[0]}): {_path(e.absolute_path)}: {e.message}" for e in errors]
    elif key in CUSTOM_KINDS:
        problems.append(f"{ident}: no served version {key[0]} in the vendored CRD schemas")
    elif kube_version not in shipped_kube_versions():
        problems.append(f"{ident}: kubernetes-validate {kv.__version__} has no schemas for Kubernetes {kube_version}")
    else:
        try:
            kv.validate(doc, kube_version, strict=True)
        except kv.ValidationError as e:
            problems.append(f"{ident} (Kubernetes {e.version}): {_path(e.absolute_path)}: {e.message}")
        except kv.SchemaNotFoundError as e:
            problems.append(f"{ident}: {e.message}")
    problems += [f"{ident} (API server rules): {path}: {reason}" for path, reason in apiserver_problems(doc)]
    return problems


def all_problems(docs: list[dict], kube_version: str) -> list[str]:
    return [p for doc in docs for p in manifest_problems(doc, kube_version)]


# ----------------------------------------------------------------- tests ---
@pytest.fixture(scope="module")
def rendered(all_on_values) -> dict[str, list[dict]]:
    return {"default values": render(), "every option on": render(all_on_values)}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", ["default values", "every option on"])
def test_every_manifest_is_valid(rendered, values, kube_version):
    docs = rendered[values]
    problems = all_problems(docs, kube_version)
    assert problems == [], f"{values}, Kubernetes {kube_version}:\n" + "\n".join(problems)


def test_every_kind_is_checked_by_a_schema(rendered, all_on_values):
    """Nothing slips through as "no schema": the all-on render has the two custom kinds too."""
    kinds = {(d["apiVersion"], d["kind"]) for d in rendered["every option on"]}
    if all_on_values["prometheusRule"]["enabled"]:
        assert ("monitoring.coreos.com/v1", "PrometheusRule") in kinds
    assert ("monitoring.coreos.com/v1", "ServiceMonitor") in kinds
    assert set(crd_validators()) >= CUSTOM_KINDS


def test_longest_release_name_gives_valid_names(all_on_values):
    """Helm allows release names up to 53 characters; every derived name must still be valid."""
    docs = render(all_on_values, name="r" * 53)
    problems = all_problems(docs, KUBE_VERSIONS[-1])
    assert problems == [], "\n".join(problems)


def _deployment(docs: list[dict]) -> dict:
    return copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))


def test_broken_manifests_are_rejected_with_manifest_path_and_reason(rendered):
    """The check can fail: deliberately broken manifests, each with the line it must produce."""
    docs = rendered["every option on"]
    oldest = KUBE_VERSIONS[0]
    name = _deployment(docs)["metadata"]["name"]

    typo = _deployment(docs)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    (problem,) = manifest_problems(typo, oldest)
    assert problem.startswith(f"Deployment/{name} (Kubernetes {oldest}): spec.template.spec.containers[0]: ")
    assert "imagePullPolcy" in problem and "not allowed" in problem

    wrong_type = _deployment(docs)
    wrong_type["spec"]["replicas"] = "one"
    (problem,) = manifest_problems(wrong_type, oldest)
    assert problem.startswith(f"Deployment/{name} (Kubernetes {oldest}): spec.replicas: 'one' is not of type 'integer'")

    bad_label = _deployment(docs)
    bad_label["spec"]["template"]["metadata"]["labels"]["team"] = "platform/ops"
    (problem,) = manifest_problems(bad_label, oldest)
    assert problem.startswith(f"Deployment/{name} (API server rules): spec.template.metadata.labels.team: ")

    sm = copy.deepcopy(next(d for d in docs if d["kind"] == "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["interval"] = "soon"
    sm["spec"]["endpoints"][0]["scrape_timeout"] = "10s"  # Prometheus' spelling, not the CRD's
    problems = manifest_problems(sm, oldest)
    ident = f"ServiceMonitor/{sm['metadata']['name']} (CRD schema monitoring.coreos.com/v1)"
    assert len(problems) == 2, problems
    assert any(p.startswith(f"{ident}: spec.endpoints[0].interval: 'soon' does not match") for p in problems), problems
    assert any(p.startswith(f"{ident}: spec.endpoints[0]: ") and "scrape_timeout" in p for p in problems), problems


def test_broken_prometheus_rule_is_rejected():
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "broken", "namespace": "monitoring"},
            "spec": {"groups": [
                {"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5 minutes"}]},
                {"name": "g", "rules": [{"record": "r", "expr": 1}]},  # duplicate group name; int expr is fine
                {"rules": []},  # no name
            ]}}
    problems = manifest_problems(rule, KUBE_VERSIONS[-1])
    ident = "PrometheusRule/broken (CRD schema monitoring.coreos.com/v1)"
    assert len(problems) == 3, problems
    assert f"{ident}: spec.groups: duplicate entry with {{'name': \"'g'\"}} (list-type map)" in problems
    assert any(p.startswith(f"{ident}: spec.groups[0].rules[0].for: '5 minutes' does not match") for p in problems)
    assert f"{ident}: spec.groups[2]: 'name' is a required property" in problems


def test_a_kubernetes_version_without_schemas_is_reported(rendered):
    doc = rendered["default values"][0]
    (problem,) = [p for p in manifest_problems(doc, "1.2") if "API server rules" not in p]
    assert "no schemas for Kubernetes 1.2" in problem


def test_unknown_custom_kind_version_is_reported():
    doc = {"apiVersion": "monitoring.coreos.com/v1alpha1", "kind": "ServiceMonitor", "metadata": {"name": "x"}}
    (problem,) = manifest_problems(doc, KUBE_VERSIONS[-1])
    assert "ServiceMonitor/x" in problem and "v1alpha1" in problem


def test_vendored_crds_are_the_documented_release():
    readme = (SCHEMAS_DIR / "README.md").read_text()
    for name in CRD_FILES:
        crd = yaml.safe_load((SCHEMAS_DIR / name).read_text())
        version = crd["metadata"]["annotations"]["operator.prometheus.io/version"]
        assert f"v{version}" in readme and name in readme, f"{name}: README.md must name the release v{version}"
    assert "Apache License" in (SCHEMAS_DIR / "LICENSE-prometheus-operator").read_text()

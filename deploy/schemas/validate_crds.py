#!/usr/bin/env python3
"""Validate the custom resources in (multi-document) YAML against deploy/schemas/*.json.

    kubectl kustomize deploy/k8s/base | python deploy/schemas/validate_crds.py -
    python deploy/schemas/validate_crds.py deploy/examples/k6-testrun.yaml

Documents of built-in Kubernetes API groups (apps/v1, batch/v1, ...) are skipped: they are
kubernetes-validate's job; with --k8s-version (and kubernetes-validate installed) this
script still checks that such a kind exists in that Kubernetes version, because
kubernetes-validate only warns about a kind it has no schema for (`kind: Deploymnet`).
Every other document must have a schema here, matched on its
apiVersion and kind through the schema's `x-kubernetes-group-version-kind`; a custom kind
without one is an error, never a silent pass. Duplicate keys in a mapping are errors too
(YAML parsers usually keep the last one without a word).

Needs only PyYAML and jsonschema. Exit status: 0 all valid, 1 any error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent

# API groups served by kube-apiserver itself ("" is the core group, apiVersion "v1").
BUILTIN_GROUPS = frozenset({
    "", "admissionregistration.k8s.io", "apiextensions.k8s.io", "apiregistration.k8s.io",
    "apps", "authentication.k8s.io", "authorization.k8s.io", "autoscaling", "batch",
    "certificates.k8s.io", "coordination.k8s.io", "discovery.k8s.io", "events.k8s.io",
    "flowcontrol.apiserver.k8s.io", "internal.apiserver.k8s.io", "networking.k8s.io",
    "node.k8s.io", "policy", "rbac.authorization.k8s.io", "resource.k8s.io",
    "scheduling.k8s.io", "storage.k8s.io", "storagemigration.k8s.io",
})


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping with the same key twice."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_schemas(directory: Path) -> dict[tuple[str, str], tuple[str, Any]]:
    index: dict[tuple[str, str], tuple[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            index[(api_version, gvk["kind"])] = (path.name, schema)
    return index


def documents(name: str) -> Iterator[tuple[int, Any]]:
    text = sys.stdin.read() if name == "-" else Path(name).read_text()
    for number, doc in enumerate(yaml.load_all(text, Loader=StrictLoader), start=1):
        if doc is not None:
            yield number, doc


def _where(path: Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "(root)"


def builtin_kind_known(doc: dict[str, Any], k8s_version: str) -> bool:
    """True if kubernetes-validate has a schema for this built-in apiVersion and kind."""
    import kubernetes_validate  # optional dependency

    try:
        kubernetes_validate.validate(doc, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        pass  # field errors are reported by the kubernetes-validate run itself
    return True


def validate_file(name: str, index: dict[tuple[str, str], tuple[str, Any]],
                  k8s_version: str | None = None) -> tuple[int, list[str]]:
    """Returns (custom resources checked, error lines)."""
    label = "<stdin>" if name == "-" else name
    errors: list[str] = []
    checked: list[str] = []
    builtin = 0
    try:
        docs = list(documents(name))
    except (OSError, yaml.YAMLError) as err:
        return 0, [f"{label}: cannot read YAML: {err}"]
    if not docs:
        return 0, [f"{label}: no YAML documents"]
    for number, doc in docs:
        where = f"{label}: document {number}"
        if not isinstance(doc, dict):
            errors.append(f"{where}: not a mapping")
            continue
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            errors.append(f"{where}: apiVersion and kind must be strings")
            continue
        group = api_version.rpartition("/")[0]
        if group in BUILTIN_GROUPS:
            builtin += 1
            if k8s_version and not builtin_kind_known(doc, k8s_version):
                errors.append(f"{where}: {kind} ({api_version}) is not a built-in kind of "
                              f"Kubernetes {k8s_version}")
            continue
        name_ = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
        where = f"{where} ({kind}/{name_})"
        found = index.get((api_version, kind))
        if found is None:
            errors.append(f"{where}: no vendored schema for {kind} ({api_version}) in "
                          f"deploy/schemas/; add it to generate.py")
            continue
        schema_file, schema = found
        validator_cls = jsonschema.validators.validator_for(schema)
        validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
        problems = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for problem in problems:
            errors.append(f"{where}: {_where(problem.absolute_path)}: {problem.message} "
                          f"[{schema_file}]")
        checked.append(kind)
    if not errors:
        kinds = ", ".join(sorted(set(checked))) or "none"
        print(f"{label}: {len(checked)} custom resource(s) valid ({kinds}); "
              f"{builtin} built-in document(s) left to kubernetes-validate")
    return len(checked), errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="YAML files, or - for standard input")
    parser.add_argument("--schemas", type=Path, default=HERE, help="schema directory")
    parser.add_argument("--require", type=int, default=0, metavar="N",
                        help="fail unless at least N custom resources were checked in all")
    parser.add_argument("--k8s-version", metavar="X.Y",
                        help="also check that built-in kinds exist in this Kubernetes version "
                             "(needs kubernetes-validate)")
    args = parser.parse_args()

    index = load_schemas(args.schemas)
    total, failed = 0, False
    for name in args.files:
        count, errors = validate_file(name, index, args.k8s_version)
        total += count
        for line in errors:
            print(f"ERROR {line}", file=sys.stderr)
        failed = failed or bool(errors)
    if total < args.require:
        print(f"ERROR expected at least {args.require} custom resources, checked {total}",
              file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

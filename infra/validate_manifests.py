"""Validates every Kubernetes manifest under the given directories against the API's
schemas, offline: core kinds with kubernetes-validate (which bundles Kubernetes' JSON
schemas), custom resources against the openAPIV3Schema of their CustomResourceDefinitions
(KEDA's, from its release on the Go module proxy). Strict: an unknown field is an error,
as it is for `kubectl apply --validate=strict`. A kind with no schema is an error too.

usage: validate_manifests.py KUBERNETES_VERSION CRD_DIR MANIFEST_DIR...
"""

import copy
import pathlib
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml


def strict(schema):
    """The schema with unknown properties refused wherever it lists its properties."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def custom_resource_schemas(crd_dir):
    """(apiVersion, kind) -> the strict schema of every CRD version in crd_dir."""
    schemas = {}
    for path in sorted(pathlib.Path(crd_dir).glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


def main():
    kubernetes_version, crd_dir, *dirs = sys.argv[1:]
    custom = custom_resource_schemas(crd_dir)
    if not custom:
        sys.exit(f"no CustomResourceDefinition in {crd_dir}")
    failures, checked = [], 0
    for path in sorted(p for d in dirs for p in pathlib.Path(d).rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            name = f"{path}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
            checked += 1
            try:
                kv.validate(document, kubernetes_version, strict=True)
            except kv.SchemaNotFoundError:
                schema = custom.get((document.get("apiVersion"), document.get("kind")))
                if schema is None:
                    failures.append(f"{name}: no schema for {document.get('apiVersion')}")
                    continue
                for error in jsonschema.Draft7Validator(schema).iter_errors(document):
                    failures.append(f"{name}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
            except kv.ValidationError as error:
                failures.append(f"{name}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"{checked} manifests checked against Kubernetes {kubernetes_version} and {len(custom)} custom resource schemas")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Check tests/data/kuberay_v1.7.0_subset.yaml against the KubeRay CRDs it claims to follow.

    python tests/data/check_kuberay_subset.py KUBERAY/ray-operator/config/crd/bases

KUBERAY is a checkout of github.com/ray-project/kuberay at the tag named in the subset's x-source.
Every field of the subset must exist at the same place in the CRD's openAPIV3Schema with the same
type; enums and required lists must be the CRD's. Prints each difference; exits 1 if there is one.
Not run by the tests (it needs the CRDs, which the repository does not ship): run it by hand after
changing the subset or the KubeRay version.
"""
import sys
from pathlib import Path

import yaml

SUBSET = Path(__file__).with_name("kuberay_v1.7.0_subset.yaml")


def crd_schema(folder: Path, kind: str) -> dict:
    crd = yaml.safe_load((folder / f"ray.io_{kind.lower()}s.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def compare(sub: dict, crd: dict, path: str, defs: dict, problems: list[str]) -> None:
    while "$ref" in sub:
        sub = defs[sub["$ref"].rsplit("/", 1)[-1]]
    if path.endswith(".metadata") and path.count(".") == 1:
        return  # ObjectMeta: the CRD leaves it to the API server
    if "anyOf" in sub:  # a quantity: the CRD marks it int-or-string
        if not crd.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: int-or-string here, not in the CRD")
        return
    if sub.get("type") != crd.get("type"):
        problems.append(f"{path}: type {sub.get('type')}, CRD {crd.get('type')}")
    if sorted(sub.get("enum", [])) != sorted(crd.get("enum", [])):
        problems.append(f"{path}: enum {sub.get('enum')}, CRD {crd.get('enum')}")
    if "properties" in sub and sorted(sub.get("required", [])) != sorted(crd.get("required", [])):
        problems.append(f"{path}: required {sub.get('required')}, CRD {crd.get('required')}")
    for name, child in sub.get("properties", {}).items():
        if name not in crd.get("properties", {}):
            problems.append(f"{path}.{name}: not in the CRD")
        else:
            compare(child, crd["properties"][name], f"{path}.{name}", defs, problems)
    if "items" in sub:
        compare(sub["items"], crd.get("items", {}), f"{path}[]", defs, problems)
    if isinstance(sub.get("additionalProperties"), dict):
        if not isinstance(crd.get("additionalProperties"), dict):
            problems.append(f"{path}: a map here, not in the CRD")
        else:
            compare(sub["additionalProperties"], crd["additionalProperties"], f"{path}.*", defs, problems)


def main(folder: str) -> int:
    subset = yaml.safe_load(SUBSET.read_text())
    problems: list[str] = []
    for kind, schema in subset["kinds"].items():
        compare(schema, crd_schema(Path(folder), kind), kind, subset["$defs"], problems)
    print("\n".join(problems) or f"{SUBSET.name}: every field matches the CRDs in {folder}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

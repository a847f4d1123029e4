"""The house plan (shared DESIGN.md), checked: one stem per op family everywhere, Triton twins with their C++
op's schema, no import cycle and no private name imported across modules."""

import ast
import pathlib
import re

import pytest
import torch

from fastcascade import _ops

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"fastcascade": REPO / "fastcascade", "fastcascade.kernels": REPO / "kernels"}


def _modules():
    """{dotted module name: path} of fastcascade (the source tree, kernels/ as fastcascade.kernels)."""
    out = {}
    for pkg, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: pathlib.Path):
    """(imported module, imported names) for every import in the file, at any depth (lazy imports too)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module) if node.level else node.module
            yield target, [a.name for a in node.names]


def _graph():
    """Edges between fastcascade's own modules; `from pkg import sub` counts as an edge to pkg.sub."""
    edges = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for target, names in _imports(m, path):
            if target is None:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                edges[m].update(subs)
            elif target in MODULES and target != m:
                # importing names from a package means running it; a module's own parent is already running
                if not m.startswith(target + "."):
                    edges[m].add(target)
    return edges


def test_no_import_cycle_inside_the_package():
    edges = _graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_private_name_is_imported_across_modules():
    """A helper used in two modules lives in one and has a public name there."""
    bad = []
    for m, path in MODULES.items():
        for target, names in _imports(m, path):
            if target and target.split(".")[0] == "fastcascade":
                bad += [f"{m} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"
                        and f"{target}.{n}" not in MODULES]
    assert not bad, bad


def test_every_family_has_one_stem_everywhere():
    """fastcascade/_ops/<stem>.py, kernels/<stem>.py, csrc/<stem>/<op>_{cpu.cpp,cuda.cu}, tests/test_<stem>.py."""
    missing = []
    for stem in _ops.FAMILIES:
        for path in (REPO / "fastcascade" / "_ops" / f"{stem}.py", REPO / "kernels" / f"{stem}.py",
                     REPO / "csrc" / stem, REPO / "tests" / f"test_{stem}.py"):
            if not path.exists():
                missing.append(str(path.relative_to(REPO)))
        backends = {p.name for p in (REPO / "csrc" / stem).glob("*")} if (REPO / "csrc" / stem).is_dir() else set()
        if not any(n.endswith("_cpu.cpp") for n in backends) or not any(n.endswith("_cuda.cu") for n in backends):
            missing.append(f"csrc/{stem}/*_cpu.cpp and *_cuda.cu")
    # every kernel folder and Triton module belongs to a family
    extra = [p.name for p in (REPO / "csrc").iterdir() if p.is_dir() and p.name != "common" and p.name not in _ops.FAMILIES]
    extra += [p.name for p in (REPO / "kernels").glob("*.py")
              if p.stem not in _ops.FAMILIES and not p.stem.startswith("_")]
    assert not missing and not extra, (missing, extra)


def _family_ops():
    """(family, op name) for every op the C++ schema block defines."""
    text = (REPO / "csrc" / "fastcascade.cpp").read_text()
    names = re.findall(r'm\.def\("(\w+)\(', text)
    owner = {}
    for stem, fam in _ops.FAMILIES.items():
        for name in fam.FAKES:
            owner[name] = stem
    return [(owner.get(n), n) for n in names]


def test_every_schema_belongs_to_a_family_with_a_fake_kernel():
    orphans = [n for fam, n in _family_ops() if fam is None]
    assert not orphans, f"ops without a registration in fastcascade/_ops: {orphans}"


def test_backward_ops_read_as_private():
    """An op that only autograd calls is named like torchvision's _roi_align_backward."""
    public_backward = [n for _, n in _family_ops() if "backward" in n and not n.startswith("_")]
    assert not public_backward, public_backward


def _signature(schema) -> tuple:
    def norm(t):
        return str(t).replace("SymInt", "int")
    args = tuple((a.name, norm(a.type)) for a in schema.arguments)
    rets = tuple(norm(r.type) for r in schema.returns)
    return args, rets


@pytest.mark.skipif(not _ops.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("name", [n for _, n in _family_ops()])
def test_triton_twin_has_the_cpp_schema(name):
    """Each *_triton op takes the same arguments (names and types, in order) and returns the same types as
    its C++ op, so one registration (fake kernel and autograd) serves both."""
    _ops.load_triton_ops()
    cpp = getattr(torch.ops.fastcascade, name).default._schema
    twin = getattr(torch.ops.fastcascade, name + "_triton").default._schema
    assert _signature(twin) == _signature(cpp), f"\n  C++:    {cpp}\n  Triton: {twin}"


# the AV1 partition domain (fastcascade.data) and the demo built on it sit above every generic layer
DOMAIN = ("fastcascade.data", "fastcascade.demo")
ABOVE_THE_DOMAIN = ("fastcascade", "fastcascade.__main__")


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_generic_layer_imports_the_domain():
    edges = _graph()
    generic = [m for m in MODULES if not _in(m, DOMAIN) and m not in ABOVE_THE_DOMAIN]
    assert "fastcascade.cascade.runner" in generic and "fastcascade.train.batches" in generic
    bad = sorted(f"{m} imports {t}" for m in generic for t in edges[m] if _in(t, DOMAIN))
    assert not bad, bad


def test_the_domain_check_sees_an_import_of_the_domain(tmp_path, monkeypatch):
    """The check above reads real imports: a generic module that imports the domain is reported."""
    (tmp_path / "metrics.py").write_text("from .data.labels import NONE\n")
    fake = dict(MODULES, **{"fastcascade.metrics": tmp_path / "metrics.py"})
    monkeypatch.setitem(globals(), "MODULES", fake)
    with pytest.raises(AssertionError, match="fastcascade.metrics imports fastcascade.data.labels"):
        test_no_generic_layer_imports_the_domain()

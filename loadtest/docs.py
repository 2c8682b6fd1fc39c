"""Write one generated section of docs/benchmarks.md without touching anyone else's.

Each section lives between ``<!-- KEY:begin -->`` and ``<!-- KEY:end -->``; a rerun replaces only that
block (or appends it the first time), and the file is rewritten atomically.
"""

from __future__ import annotations

from pathlib import Path

from training.checkpoint import atomic_write_bytes


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
    atomic_write_bytes(path, lambda f: f.write(text.encode()))

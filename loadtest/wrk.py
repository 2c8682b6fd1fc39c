"""``wrk`` as the load generator: a C client that costs the 2-core machine far less CPU than the
server it loads (a Python generator would take a large share of the cores it measures).

Each request POSTs one held-out PNG drawn at random; ``done`` prints one JSON line that ``run_wrk``
parses. wrk keeps ``-c`` connections busy back to back (closed loop), one thread.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

# wrk is a C program with no wheel on PyPI: the one system package make bench-serve, soak and fault need.
WRK_INSTALL = "apt-get install -y wrk"

WRK_SCRIPT = r"""
-- POST a random held-out image per request; print one JSON line at the end.
local bodies = {}
function init(args)
  for i = 1, #args do
    local f = assert(io.open(args[i], "rb")); bodies[#bodies + 1] = f:read("*all"); f:close()
  end
  math.randomseed(os.time() + (args.n or 0))
end
function request()
  return wrk.format("POST", nil, {["Content-Type"] = "application/octet-stream"}, bodies[math.random(#bodies)])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def write_images(
    run: str, data_dir: str | None, out: Path, artifacts_dir: Path = Path("artifacts"), runs_dir: Path = Path("runs")
) -> tuple[list[Path], str]:
    """Held-out images of ``run`` as PNG files in ``out`` (wrk reads bodies from files); returns the
    paths and where the images came from."""
    from loadtest.images import load_pool

    pool = load_pool(run, data_dir, limit=128, artifacts_dir=artifacts_dir, runs_dir=runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, png in enumerate(pool.images):
        p = out / f"{i:03d}.png"
        p.write_bytes(png)
        paths.append(p)
    return paths, pool.source


def write_wrk_script(path: Path) -> Path:
    path.write_text(WRK_SCRIPT)
    return path


def wrk_binary() -> str:
    """wrk's path; FileNotFoundError with one line naming the install command when it is not on PATH."""
    found = shutil.which("wrk")
    if not found:
        raise FileNotFoundError(
            "wrk not found on PATH (the load generator of make bench-serve, soak and "
            f"fault); install it: {WRK_INSTALL} (Debian/Ubuntu)"
        )
    return found


def run_wrk(url: str, images: list[Path], connections: int, duration_s: float, script: Path) -> dict:
    """One wrk run; returns its JSON summary plus the CPU seconds wrk used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [
            wrk_binary(),
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
            "--",
            *map(str, images),
        ],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-300:] or proc.stdout[-300:]}")
    out = json.loads(line[len("WRKJSON ") :])
    out["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out

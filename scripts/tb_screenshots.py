"""Screenshots of TensorBoard as a user sees it, for the README (headless Debian chromium).

Serves each log dir with `qexp tb` on 127.0.0.1, waits until TensorBoard lists its runs, and
lets chromium load one dashboard per shot and write a PNG:

    python scripts/tb_screenshots.py --out docs/tensorboard \
        "compare=REPORT/tensorboard#scalars&_smoothingWeight=0@1400x800" \
        "compare_text=REPORT/tensorboard#text" "hparams=SWEEP#hparams@2400x760"

(README.md, section TensorBoard, has the commands that made the README's screenshots.)

Each SHOT is NAME=DIR#DASHBOARD[@WIDTHxHEIGHT] (dashboards: timeseries, scalars, text,
hparams, images, ...; default size 1400x900). The fragment after DIR is TensorBoard's own
URL fragment, so dashboard options it keeps there can follow, e.g. ``#scalars&_smoothingWeight=0``.
Chromium runs with a fresh profile (TensorBoard's default settings) and no network beyond
127.0.0.1; pages load with TensorBoard's ``forceSVG`` flag, since its WebGL charts stay blank
in headless chromium without a GPU (the charts look the same).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@dataclass
class Shot:
    name: str
    logdir: Path
    fragment: str
    width: int = 1400
    height: int = 900


def parse_shot(text: str) -> Shot:
    """``NAME=DIR#DASHBOARD[@WxH]`` -> Shot."""
    name, sep, rest = text.partition("=")
    if not sep or "#" not in rest:
        raise SystemExit(f"tb_screenshots: bad shot {text!r}: expected NAME=DIR#DASHBOARD[@WxH]")
    where, _, fragment = rest.partition("#")
    shot = Shot(name, Path(where), fragment)
    if "@" in fragment:
        shot.fragment, _, size = fragment.rpartition("@")
        w, _, h = size.partition("x")
        shot.width, shot.height = int(w), int(h)
    if not shot.logdir.is_dir():
        raise SystemExit(f"tb_screenshots: no such directory: {shot.logdir}")
    return shot


def free_port() -> int:
    from qexp.report.tb import free_port as pick

    return pick()


def wait_for_runs(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    """Poll TensorBoard's run list until it is non-empty and stable (the log dir is read)."""
    deadline = time.monotonic() + timeout
    last: list[str] | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tb_screenshots: qexp tb exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}data/runs", timeout=5) as resp:
                runs = json.loads(resp.read())
        except OSError:
            runs = None
        if runs and runs == last:
            return runs
        last = runs
        time.sleep(2.0)
    raise SystemExit(f"tb_screenshots: TensorBoard on {url} listed no runs in {timeout:.0f}s")


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    """One chromium run with a fresh profile: load ``url``, let it render, write ``out``."""
    with tempfile.TemporaryDirectory(prefix="tb_shot_profile_") as profile:
        cmd = [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}",
            f"--screenshot={out}",
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"tb_screenshots: chromium failed on {url}:\n{proc.stderr[-2000:]}")


def serve(logdir: Path) -> tuple[subprocess.Popen, str]:
    """`qexp tb logdir` on a free port; returns the process and its URL once runs are listed."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qexp.cli", "tb", str(logdir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        runs = wait_for_runs(url, proc)
    except BaseException:
        proc.terminate()
        proc.wait(timeout=30)
        raise
    print(f"serving {logdir} on {url} ({len(runs)} runs)", flush=True)
    return proc, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shots", nargs="+", metavar="NAME=DIR#DASHBOARD[@WxH]")
    parser.add_argument("--out", type=Path, default=Path("docs/tensorboard"))
    parser.add_argument(
        "--wait-ms", type=int, default=20000, help="chromium's virtual time to render a page"
    )
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        raise SystemExit(f"tb_screenshots: {CHROMIUM} not found (Debian: apt install chromium)")
    shots = [parse_shot(s) for s in args.shots]
    args.out.mkdir(parents=True, exist_ok=True)
    by_dir: dict[Path, list[Shot]] = {}
    for shot in shots:
        by_dir.setdefault(shot.logdir.resolve(), []).append(shot)
    for logdir, group in by_dir.items():
        proc, url = serve(logdir)
        try:
            for shot in group:
                path = args.out / f"{shot.name}.png"
                # SVG charts: headless chromium without a GPU leaves WebGL charts blank
                page = f"{url}?forceSVG=true#{shot.fragment}"
                screenshot(page, path, shot.width, shot.height, args.wait_ms)
                print(f"wrote {path} ({page})", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

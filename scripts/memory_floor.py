"""What a training process holds resident before qexp allocates anything: the memory floor.

Each stage runs in a fresh Python process and prints its resident set (VmRSS, in MB of 10^6
bytes like ``peak_rss_mb``), split into anonymous and file-backed pages, plus the libraries with
the most resident pages (a library's zero-initialised data shows up as the anonymous mapping
right after its file mappings):

- ``python``: the bare interpreter;
- ``import torch``: torch and the libraries it links (a CUDA build loads the CUDA libraries
  even where no GPU is present);
- ``+ optimizer``: one ``torch.optim.Adam`` made (torch.optim imports torch._dynamo, and with it
  sympy and torch.fx, on first use);
- ``+ qexp``: qexp's training modules and their dependencies (Hydra, TensorBoard writer).

With a run directory as argument it also prints that run's ``peak_rss_mb`` from metrics.json,
so the floor and the run's peak come from one command:

    python scripts/memory_floor.py outputs/2026-11-24/21-15-00
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STAGES = {
    "python": "",
    "import torch": "import torch",
    "+ optimizer": "import torch; torch.optim.Adam(torch.nn.Linear(2, 2).parameters())",
    "+ qexp": (
        "import torch; torch.optim.Adam(torch.nn.Linear(2, 2).parameters()); "
        "import qexp.train.run, qexp.train.trainer, torch.utils.tensorboard"
    ),
}

#: printed by each stage's process: its VmRSS split and its biggest libraries
PROBE = r"""
import re, collections
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(status[k].split()[0])
per_lib = collections.Counter()
prev_end, prev_name = -1, ""
for line in open("/proc/self/smaps"):
    parts = line.split()
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        start, end = (int(a, 16) for a in parts[0].split("-"))
        name = parts[5] if len(parts) > 5 else ""
        if name:
            owner = name
        elif start == prev_end and prev_name.startswith("/"):
            owner = f"{prev_name} (its zeroed data)"  # a library's .bss follows its mappings
        else:
            owner = "[anonymous mappings]"
        prev_end, prev_name = end, name
    elif parts[0] == "Rss:":
        per_lib[owner] += int(parts[1])
print(kb("VmRSS"), kb("RssAnon"), kb("RssFile"))
for name, size in per_lib.most_common(5):
    print(size, name)
"""


def mb(kib: int) -> float:
    """kB as /proc writes them (KiB) in MB (10^6 bytes, as ``peak_rss_mb``)."""
    return kib * 1024 / 1e6


def measure(code: str) -> tuple[list[int], list[tuple[int, str]]]:
    """(VmRSS, RssAnon, RssFile in kB) and the top resident mappings of a process running
    ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{PROBE}"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    totals = [int(v) for v in out[0].split()]
    top = [(int(line.split(" ", 1)[0]), line.split(" ", 1)[1]) for line in out[1:]]
    return totals, top


def main() -> None:
    if not Path("/proc/self/smaps").exists():
        sys.exit("memory_floor.py reads /proc (Linux only)")
    print(f"{'stage':14s} {'RSS MB':>8s} {'anon MB':>8s} {'file MB':>8s}")
    tops = {}
    for stage, code in STAGES.items():
        (rss, anon, file), top = measure(code)
        tops[stage] = top
        print(f"{stage:14s} {mb(rss):8.0f} {mb(anon):8.0f} {mb(file):8.0f}")
    print("\nlargest resident mappings after `import torch` (MB):")
    for size, name in tops["import torch"]:
        print(f"  {mb(size):6.0f}  {name}")
    for run_dir in sys.argv[1:]:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        print(f"\n{run_dir}: peak_rss_mb {metrics.get('peak_rss_mb')}")


if __name__ == "__main__":
    main()

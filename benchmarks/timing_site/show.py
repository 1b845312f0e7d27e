"""Print what ``benchmarks/timing_site/sitecustomize.py`` wrote: per process, each target's calls and its
wall / CPU milliseconds per call (largest total wall first), and the GC pauses per generation.

    .venv/bin/python benchmarks/timing_site/show.py DIR [TOP]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(directory: Path, top: int = 40) -> int:
    for path in sorted(directory.glob("*.json")):
        found = json.loads(path.read_text())
        process = found["argv"][-1] if found.get("argv") else path.stem
        if "stats" in found:
            print(f"{path.name}  {process}")
            ranked = sorted(found["stats"].items(), key=lambda item: -item[1][1])[:top]
            for target, (calls, wall_ms, cpu_ms) in ranked:
                print(f"  {target:<72} calls {calls:>7}  wall {wall_ms / calls:7.3f} ms  cpu {cpu_ms / calls:7.3f} ms")
        else:
            print(f"{path.name}  {process}  GC collections per generation {found['n']}, pause ms total "
                  f"{[round(v) for v in found['ms']]}, longest {[round(v, 1) for v in found['max']]}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) == 3 else 40))

"""Rewrite a wheel without the native libraries one machine cannot use: `python scripts/slim_wheel.py WHEEL PATTERN`.

bitsandbytes' wheel carries one 4-26 MB library per CUDA, ROCm and XPU version (43 MB zipped); a CUDA machine loads
only the one that matches its torch's CUDA. `make device-pack` keeps the CPU library and those whose name matches
PATTERN (a regular expression, e.g. `cuda13`), so the wheel fits beside the rest of the GPU check's files. The other
`.so` files and their RECORD lines are dropped; everything else is copied as it is. The wheel is replaced in place.
(No packaging tool does this: pip and wheel install or build whole wheels only.)
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, keep: str) -> list[str]:
    """Drop the `lib*.so` files of `wheel` whose name matches neither `keep` nor `_cpu`; return the dropped names."""
    pattern = re.compile(f"{keep}|_cpu\\.so$")

    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("lib") and base.endswith(".so") and not pattern.search(base)

    tmp = wheel.with_suffix(".slim.tmp")
    gone = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if dropped(info.filename):
                gone.append(info.filename)
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(info, data)
    os.replace(tmp, wheel)
    return gone


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[0])
    names = slim(Path(sys.argv[1]), sys.argv[2])
    print(f"{sys.argv[1]}: dropped {len(names)} libraries")

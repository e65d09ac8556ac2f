"""Rewrite README.md's dataset table from the declarations in src/fgvr/datasets/ (tests check it is current).

    python scripts/dataset_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fgvr.datasets import README_BEGIN, README_END, readme_table  # noqa: E402


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: the markers {README_BEGIN!r} ... {README_END!r} are missing")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + readme_table() + tail, encoding="utf-8")
    print(f"wrote the dataset table of {readme}")


if __name__ == "__main__":
    main()

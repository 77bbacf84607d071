#!/usr/bin/env python3
"""Keep the Helm chart's copies of repository files byte-identical to their sources.

A chart can only package files inside its own directory, so it carries copies:

- ``crds/apiconcurrencypool.yaml`` -> ``charts/apipool/crds/apiconcurrencypool.yaml``
  (the CRD, which Helm installs from the chart's ``crds/``);
- ``examples/python/general_worker.py`` -> ``charts/apipool/files/general_worker.py``
  (the general worker the chart ships as a ConfigMap).

Usage:
    python scripts/sync_crds.py            copy every source over its chart copy
    python scripts/sync_crds.py --check    change nothing; exit 1 with a unified
                                           diff when a copy differs or is missing
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = Path("charts/apipool")

# (source, copy), relative to the repository root.
PAIRS: tuple[tuple[Path, Path], ...] = (
    (Path("crds/apiconcurrencypool.yaml"), CHART / "crds/apiconcurrencypool.yaml"),
    (Path("examples/python/general_worker.py"), CHART / "files/general_worker.py"),
)


def diff(source: Path, copy: Path, root: Path) -> str:
    """A unified diff from the copy to the source; empty when they are identical."""
    want = (root / source).read_bytes()
    have = (root / copy).read_bytes() if (root / copy).exists() else None
    if have == want:
        return ""
    lines = difflib.unified_diff(
        [] if have is None else have.decode(errors="replace").splitlines(keepends=True),
        want.decode(errors="replace").splitlines(keepends=True),
        fromfile=f"{copy}" if have is not None else f"{copy} (missing)",
        tofile=f"{source}",
    )
    text = "".join(lines)
    # Byte differences that are not line differences (e.g. a final newline).
    return text or f"{copy} differs from {source} (bytes only)\n"


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="report differences (exit 1) instead of copying"
    )
    args = parser.parse_args(argv)
    stale = 0
    for source, copy in PAIRS:
        text = diff(source, copy, root)
        if not text:
            continue
        stale += 1
        if args.check:
            sys.stdout.write(text)
        else:
            (root / copy).parent.mkdir(parents=True, exist_ok=True)
            (root / copy).write_bytes((root / source).read_bytes())
            print(f"updated {copy} from {source}")
    if args.check and stale:
        print(
            f"\n{stale} chart cop{'y is' if stale == 1 else 'ies are'} out of date: "
            "run `python scripts/sync_crds.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

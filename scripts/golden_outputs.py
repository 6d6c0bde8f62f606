"""Write or check the golden report files (tests/golden/): runs that a refactor must leave
byte-identical.

    .venv/bin/python scripts/golden_outputs.py --write     # before a refactor: store them
    .venv/bin/python scripts/golden_outputs.py --check     # after: byte-identical, or a diff

The small runs (tests/golden/*.yaml) are stored in the repository and also compared by
tests/test_golden.py, to 1e-6 relative (another CPU may sum floats in another order). The
quickstart (configs/quickstart.yaml, ~2 min) is stored under .cache/golden/, on this machine
only: its byte-identity is this script's check, not CI's.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
FILES = ["report.csv", "summary.csv", "stages.csv", "verdicts.csv"]
RUNS = {"every_test": (GOLDEN / "every_test.yaml", GOLDEN / "every_test"),
        "layer_options": (GOLDEN / "layer_options.yaml", GOLDEN / "layer_options"),
        "quickstart": (REPO / "configs" / "quickstart.yaml", REPO / ".cache" / "golden")}


def run(config: Path, out: Path) -> None:
    """`saliencycheck run` as a user runs it (exit 1, a gated FAIL, still writes the report)."""
    done = subprocess.run([sys.executable, "-m", "saliencycheck", "run", str(config), "-o",
                           str(out), "--set", "output.figures=false"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"{config.name}: exit {done.returncode}\n{done.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true")
    action.add_argument("--check", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=sorted(RUNS))
    args = parser.parse_args()
    differ = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            config, stored = RUNS[name]
            out = Path(tmp) / name
            run(config, out)
            if args.write:
                stored.mkdir(parents=True, exist_ok=True)
                for file in FILES:
                    shutil.copyfile(out / file, stored / file)
                print(f"{name}: stored in {stored.relative_to(REPO)}", flush=True)
                continue
            changed = [f for f in FILES if not filecmp.cmp(out / f, stored / f, shallow=False)]
            differ += [f"{name}/{f}" for f in changed]
            print(f"{name}: " + (f"DIFFERENT: {', '.join(changed)}" if changed
                                 else "byte-identical"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

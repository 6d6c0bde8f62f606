"""The Python API costs nothing over the CLI: the quickstart both ways, interleaved.

    .venv/bin/python benchmarks/api_overhead.py [--repeat 2]

"CLI" is what `saliencycheck run configs/quickstart.yaml` does after parsing its arguments
(`prepare(load_config(...))` then `run_check`); "API" is `saliencycheck.check` with the same
sections as keyword arguments and the digits model in memory. Both write into fresh temporary
folders (figures included, label randomization models trained in each, as a first run does).
Prints each run's wall time and the ratio of the minima; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import saliencycheck as sc  # noqa: E402
from saliencycheck.config import load_config  # noqa: E402
from saliencycheck.runner import prepare, run_check  # noqa: E402
from saliencycheck.zoo import digits_resnet18  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.yaml"


def cli_run(out: Path) -> None:
    run_check(prepare(load_config(CONFIG, [f"output.dir={out}"])))


def api_run(out: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    config.pop("model")
    images = config.pop("images")
    path = (CONFIG.parent / images.pop("path")).resolve()
    images["labels"] = str((CONFIG.parent / images["labels"]).resolve())
    runtime = config.pop("runtime")
    sc.check(digits_resnet18(), path, image_settings=images, methods=config.pop("methods"),
             tests=config.pop("tests"), metrics=config.pop("metrics"),
             device=runtime.pop("device"), seed=runtime.pop("seed"), runtime=runtime,
             output=out, output_settings={k: v for k, v in config.pop("output").items()
                                          if k != "dir"}, **config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    digits_resnet18()  # trained and cached before any timing
    times: dict[str, list[float]] = {"cli": [], "api": []}
    for _ in range(args.repeat):
        for name, fn in (("cli", cli_run), ("api", api_run)):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                fn(Path(tmp) / "out")
                times[name].append(time.perf_counter() - start)
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    cli, api = min(times["cli"]), min(times["api"])
    print(f"quickstart, best of {args.repeat}: CLI {cli:.1f} s, API {api:.1f} s, "
          f"API/CLI {api / cli:.3f}")


if __name__ == "__main__":
    main()

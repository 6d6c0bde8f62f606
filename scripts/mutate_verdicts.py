"""Mutation check of the verdict code, the part a CI gate trusts.

Each mutant is one realistic bug (a bound swapped, a default drifted, the wrong model judged).
It is applied to a fresh copy of the package and the verdict tests run there, with the copy as
the working directory so that the copy, not the installed package, is imported. A mutant the
tests do not fail SURVIVED: a bug the gate would ship. Usage (a few minutes):

    .venv/bin/python scripts/mutate_verdicts.py [name filter ...]
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TESTS = ["tests/test_verdict_rules.py", "tests/test_verdicts.py", "tests/test_checks.py"]

MUTANTS = [  # (name, file, original, mutated)
    ('bootstrap at 90 % instead of the stated level', 'saliencycheck/report/tables.py',
     'tail = (1 - level) / 2 * 100',
     'tail = (1 - 0.90) / 2 * 100'),
    ('library default level 0.90', 'saliencycheck/results.py',
     'CI_LEVEL = 0.95',
     'CI_LEVEL = 0.90'),
    ('completeness judged on the mean', 'saliencycheck/verdicts.py',
     'bound = s.mean if one else s.ci_high',
     'bound = s.mean'),
    ('completeness strict <', 'saliencycheck/verdicts.py',
     'verdict = PASS if bound <= tolerance else FAIL',
     'verdict = PASS if bound < tolerance else FAIL'),
    ('label randomization judges the control', 'saliencycheck/verdicts.py',
     '    if stage == "final":\n        return final',
     '    if stage == "final":\n        return len(names) - 1'),
    ('final stage of label randomization is the last (the control)',
     'saliencycheck/checks/label_randomization.py',
     'not a later stage)."""\n        return 1',
     'not a later stage)."""\n        return len(names) - 1'),
    ('max rule on the lower bound', 'saliencycheck/verdicts.py',
     'bound = mean if one else high if upper else low',
     'bound = mean if one else low if upper else high'),
    ('max rule on the mean', 'saliencycheck/verdicts.py',
     'bound = mean if one else high if upper else low',
     'bound = mean if one else mean if upper else low'),
    ('min rule on the upper bound', 'saliencycheck/verdicts.py',
     'bound = mean if one else high if upper else low',
     'bound = mean if one else high'),
    ('strict < on the max', 'saliencycheck/verdicts.py',
     'passed = bound <= limit if upper else',
     'passed = bound < limit if upper else'),
    ('floor margin without the floor', 'saliencycheck/verdicts.py',
     'else floor + threshold.max_above_floor)',
     'else threshold.max_above_floor)'),
    ('floor used for every test', 'saliencycheck/verdicts.py',
     'if test in floor_tests else math.nan',
     'if True else math.nan'),
    ('one image: no fallback to the mean', 'saliencycheck/verdicts.py',
     'one = not math.isfinite(high)  # one image: no interval',
     'one = False'),
    ('invalid tests ignored', 'saliencycheck/verdicts.py',
     'if invalid_tests and test in invalid_tests:',
     'if False:'),
    ('undefined metric FAILs instead of INVALID', 'saliencycheck/verdicts.py',
     'elif row is None or math.isnan(mean):\n                verdict = INVALID',
     'elif row is None or math.isnan(mean):\n                verdict = FAIL'),
    ('gate counts INVALID', 'saliencycheck/verdicts.py',
     'if v.verdict == FAIL and (fail_on == "all"',
     'if v.verdict != PASS and (fail_on == "all"'),
    ("gate ignores fail_on's method list", 'saliencycheck/verdicts.py',
     '(fail_on == "all" or v.method in fail_on)',
     'True'),
    ('config percentile default drifts', 'saliencycheck/config.py',
     'PostprocessOptions.percentile, gt=0, le=100,',
     '99.5, gt=0, le=100,'),
    ('view default percentile drifts', 'saliencycheck/postprocess.py',
     '    percentile: float = PostprocessOptions.percentile,\n) -> Tensor:\n    """Signed',
     '    percentile: float = 99.5,\n) -> Tensor:\n    """Signed'),
    ('ssim default data range drifts', 'saliencycheck/metrics.py',
     'data_range: float = PostprocessOptions.ssim_data_range',
     'data_range: float = 2.0'),
    ('random logit loses its floor', 'saliencycheck/checks/random_logit.py',
     '    against_floor = True\n', ''),
    ('input invariance judged like a randomization test', 'saliencycheck/checks/'
     'input_invariance.py', '    higher_is_better = True\n', ''),
    ('completeness reads as a randomization stage', 'saliencycheck/checks/completeness.py',
     '    def compares_trained(self) -> bool:\n        return True',
     '    def compares_trained(self) -> bool:\n        return False'),
    ('bootstrap resamples only images', 'saliencycheck/report/tables.py',
     'cols = rng.integers(0, repeats, (count, 1, repeats))',
     'cols = np.broadcast_to(np.arange(repeats), (count, 1, repeats))'),
]


def run_mutant(work: Path, rel: str, old: str, new: str) -> str:
    """'killed', 'SURVIVED' or 'not applied' for one mutant, with pytest's last line."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for part in ("saliencycheck", "tests", "configs", "sample_images"):
        shutil.copytree(REPO / part, work / part)
    shutil.copy(REPO / "pyproject.toml", work)
    path = work / rel
    text = path.read_text()
    if text.count(old) != 1:
        return f"not applied ({text.count(old)} matches)"
    path.write_text(text.replace(old, new))
    env = {**os.environ, "PYTHONPATH": str(work)}
    imported = subprocess.run([PY, "-c", "import saliencycheck; print(saliencycheck.__file__)"],
                              cwd=work, capture_output=True, text=True, env=env).stdout
    if not imported.startswith(str(work)):
        return f"not applied (imported {imported.strip()})"
    result = subprocess.run([PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
                            cwd=work, capture_output=True, text=True, env=env)
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return f"{'killed' if result.returncode else 'SURVIVED'}  ({last})"


def main() -> int:
    only = sys.argv[1:]
    chosen = [m for m in MUTANTS if not only or any(o in m[0] for o in only)]
    killed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel, old, new in chosen:
            outcome = run_mutant(Path(tmp) / "copy", rel, old, new)
            killed += outcome.startswith("killed")
            print(f"{outcome.split()[0]:9} {name}  {' '.join(outcome.split()[1:])}", flush=True)
    print(f"{killed}/{len(chosen)} mutants killed")
    return 0 if killed == len(chosen) else 1


sys.exit(main())

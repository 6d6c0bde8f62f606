"""The registry of sanity checks: the tests and baselines a run can compute.

Each module holds one check (its config section, model states, scoring, table and verdict rule;
see :class:`~saliencycheck.checks.base.Check`) and registers it with
:func:`~saliencycheck.checks.base.register_check`; importing it here is its one registration
line. The order below is the order of the config reference, stages.csv and the tables.
"""

from saliencycheck.checks import cascading  # noqa: F401, I001 (registration order)
from saliencycheck.checks import independent  # noqa: F401
from saliencycheck.checks import smooth_mprt  # noqa: F401
from saliencycheck.checks import entropy_mprt  # noqa: F401
from saliencycheck.checks import random_logit  # noqa: F401
from saliencycheck.checks import csc  # noqa: F401
from saliencycheck.checks import input_invariance  # noqa: F401
from saliencycheck.checks import completeness  # noqa: F401
from saliencycheck.checks import label_randomization  # noqa: F401
from saliencycheck.checks import random_floor  # noqa: F401
from saliencycheck.checks import random_map  # noqa: F401
from saliencycheck.checks import edges  # noqa: F401
from saliencycheck.checks.base import CHECKS, Check, get_check

__all__ = ["CHECKS", "Check", "get_check"]

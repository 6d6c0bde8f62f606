"""The speed machinery, apart from the science: the shared pass engine (``passes``), the
prefix activation cache (``prefix``), the affine stem (``stem``), eval-mode BatchNorm folding
(``eval_norm``), host and device memory (``host_memory``, ``device_memory``) and exact fp32 on
GPUs (``fp32``). Methods describe what rows they need (their plans, in ``methods/``); the
engine decides how those rows run.

The methods package is loaded first: its methods register themselves on ``passes``, which
reads the methods' base types, so whichever of the two a program imports first, the methods
load before ``passes`` (else importing ``passes`` first would meet itself half-built)."""

import saliencycheck.methods  # noqa: F401

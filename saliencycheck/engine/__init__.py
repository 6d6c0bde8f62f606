"""The speed machinery, apart from the science: the shared pass engine (``passes``), the
prefix activation cache (``prefix``), the affine stem (``stem``), eval-mode BatchNorm folding
(``eval_norm``), host and device memory (``host_memory``, ``device_memory``) and exact fp32 on
GPUs (``fp32``). Methods describe what rows they need (their plans, in ``methods/``); the
engine decides how those rows run. Nothing is imported here, so each module loads alone."""

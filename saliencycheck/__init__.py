"""saliencycheck: can I trust this saliency map?

Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018) and their successors, run from
one YAML config. The library entry points are `saliencycheck.config.load_config`,
`saliencycheck.runner.prepare` and `saliencycheck.runner.run_check`; attribution methods live in
`saliencycheck.methods`, similarity metrics in `saliencycheck.metrics`.
"""

__version__ = "0.1.0"

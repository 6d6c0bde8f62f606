"""The Ray backend on one small local Ray instance (CPU), shared by this module's tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from saliencycheck.errors import ConfigError
from saliencycheck.runner.ray_backend import gpus_per_task, import_ray, worker_count
from tests.test_batch import LABEL_TEST, ROOT, report, run_cli, write_project
from tests.test_cli import tiny_cnn


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    """Two CPUs; the workers import the tests' model factory from the repository root."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def crashing_cnn(num_classes: int = 10, *, marker: str) -> nn.Module:
    """`tiny_cnn` whose first forward of a 2-image batch (only units have them, never the
    driver's 1-image probe) kills its process, once: the marker file says it happened."""
    model = tiny_cnn(num_classes)

    def crash_once(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs[0].shape[0] == 2 and not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)

    model.register_forward_pre_hook(crash_once)
    return model


def test_ray_backend_gives_the_report_of_the_local_backend(local_ray,  # noqa: ANN001
                                                           tmp_path: Path) -> None:
    """Even when a worker crashes mid-run (Ray restarts it and retries its unit); with the
    label randomization test, whose models the driver trains and ships to the workers."""
    marker = tmp_path / "crashed"
    config = write_project(
        tmp_path, tests={"random_logit": {"enabled": True}, **LABEL_TEST},
        runtime={"batch_size": 2},
        model={"factory": "tests.test_ray:crashing_cnn", "factory_kwargs": {"marker": str(marker)}})
    result = run_cli("run", config, "--set", "runtime.backend=ray")
    assert result.exit_code == 0, result.output
    assert marker.exists(), "a worker must have crashed"
    result = run_cli("run", config, "-o", tmp_path / "local")  # the marker exists: no crash
    assert result.exit_code == 0, result.output
    assert report(tmp_path / "out") == report(tmp_path / "local")
    assert "label_randomization" in report(tmp_path / "out").decode()
    # Resume works with Ray too: everything stored, nothing runs again.
    result = run_cli("run", config, "--resume", "--set", "runtime.backend=ray")
    assert result.exit_code == 0, result.output
    assert "resumed: 2 of 2 units were already stored" in result.output
    assert report(tmp_path / "out") == report(tmp_path / "local")


def test_gpus_asked_of_a_cluster_without_any_is_one_line(local_ray,  # noqa: ANN001
                                                          tmp_path: Path) -> None:
    config = write_project(tmp_path, runtime={"backend": "ray", "gpus_per_task": 1})
    result = run_cli("run", config)
    assert result.exit_code == 2
    assert "runtime.gpus_per_task: 1.0 GPUs per task, but the Ray cluster has no GPUs" \
        in result.output


def test_ray_not_installed_is_one_line_exit_2(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'saliencycheck\[ray\]'"):
        import_ray()
    config = write_project(tmp_path, runtime={"backend": "ray"})
    result = run_cli("run", config)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: runtime.backend: ray needs Ray, which is not installed; pip "
                      "install 'saliencycheck[ray]' (or set runtime.backend: local)"]


def test_gpus_per_task_default_and_worker_count() -> None:
    assert gpus_per_task(None, device="auto", cluster_gpus=8) == 1
    assert gpus_per_task(None, device="cpu", cluster_gpus=8) == 0
    assert gpus_per_task(None, device="auto", cluster_gpus=0) == 0
    assert gpus_per_task(0.25, device="auto", cluster_gpus=8) == 0.25
    assert worker_count({"CPU": 64, "GPU": 8}, gpus=0.5, cpus=2, units=100) == 16
    assert worker_count({"CPU": 64, "GPU": 8}, gpus=1, cpus=16, units=100) == 4
    assert worker_count({"CPU": 2}, gpus=0, cpus=1, units=1) == 1
    assert worker_count({"CPU": 1}, gpus=0, cpus=4, units=10) == 1

"""The Ray backend on one small local Ray instance (CPU), shared by this module's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from saliencycheck.errors import ConfigError
from saliencycheck.runner.ray_backend import gpus_per_task, import_ray, worker_count
from tests.test_batch import LABEL_TEST, ROOT, report, run_cli, write_project


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    """Two CPUs; the workers import the tests' model factory from the repository root."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def test_ray_backend_gives_the_report_of_the_local_backend(local_ray,  # noqa: ANN001
                                                           tmp_path: Path) -> None:
    """With the label randomization test: its models, trained on the driver, go to the
    workers."""
    config = write_project(tmp_path, tests={"random_logit": {"enabled": True}, **LABEL_TEST})
    result = run_cli("run", config, "-o", tmp_path / "local")
    assert result.exit_code == 0, result.output
    result = run_cli("run", config, "--set", "runtime.backend=ray")
    assert result.exit_code == 0, result.output
    assert report(tmp_path / "out") == report(tmp_path / "local")
    assert "label_randomization" in report(tmp_path / "out").decode()
    # Resume works with Ray too: everything stored, nothing runs again.
    result = run_cli("run", config, "--resume", "--set", "runtime.backend=ray")
    assert result.exit_code == 0, result.output
    assert "resumed: 6 of 6 units were already stored" in result.output
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

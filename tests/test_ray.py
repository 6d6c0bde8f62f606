"""The Ray backend on the local Ray instance the CLI starts itself (CPU), as users run it.

Ray is installed by `make setup` (the `ray` extra), so these tests run in CI, never skipped.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from saliencycheck.errors import ConfigError
from saliencycheck.runner.ray_backend import (
    check_reachable,
    cluster_address,
    gpus_per_task,
    import_ray,
    worker_count,
)
from tests.test_batch import LABEL_TEST, ROOT, report, run_cli, write_project
from tests.test_cli import tiny_cnn


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster address, and workers that import the tests' model factories (the local
    instance the CLI starts inherits this environment)."""
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (
        str(ROOT), os.environ.get("PYTHONPATH")))))
    yield
    assert not ray.is_initialized(), "the CLI must shut down the Ray instance it started"


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def dying_cnn(num_classes: int = 10) -> nn.Module:
    """`tiny_cnn` whose every forward of a 2-image batch kills its process (a unit that keeps
    failing); 1-image batches, the driver's probe and unit-00001 of three images, run."""
    model = tiny_cnn(num_classes)

    def die(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs[0].shape[0] == 2:
            os._exit(1)

    model.register_forward_pre_hook(die)
    return model


def test_ray_backend_gives_the_report_of_the_local_backend(ray_env: None,
                                                           tmp_path: Path) -> None:
    """Even when a worker crashes mid-run (Ray restarts it and retries its unit); with the
    label randomization test, whose models the driver trains and ships to the workers."""
    marker = tmp_path / "crashed"
    config = write_project(
        tmp_path, tests={"random_logit": {"enabled": True}, **LABEL_TEST},
        runtime={"batch_size": 2}, thresholds={"random_logit": {"metric": "ssim", "max": 0.5}},
        model={"factory": "tests.test_ray:crashing_cnn", "factory_kwargs": {"marker": str(marker)}})
    result = run_cli("run", config, "--set", "runtime.backend=ray")
    assert result.exit_code in (0, 1), result.output
    assert marker.exists(), "a worker must have crashed"
    local = run_cli("run", config, "-o", tmp_path / "local")  # the marker exists: no crash
    assert local.exit_code == result.exit_code, local.output
    for name in ("report.csv", "summary.csv", "stages.csv", "verdicts.csv"):
        assert (tmp_path / "out" / name).read_bytes() == \
            (tmp_path / "local" / name).read_bytes(), name
    assert "label_randomization" in report(tmp_path / "out").decode()
    # Resume works with Ray too: everything stored, nothing runs again.
    result = run_cli("run", config, "--resume", "--set", "runtime.backend=ray")
    assert result.exit_code == 0, result.output
    assert "resumed: 2 of 2 units were already stored" in result.output
    assert report(tmp_path / "out") == report(tmp_path / "local")


def test_a_unit_failing_beyond_its_retries_keeps_the_others(ray_env: None,
                                                            tmp_path: Path) -> None:
    """unit-00000 kills its worker every time; unit-00001, in flight on the other worker,
    is still stored, and the message says how to finish (exit 3, details in error.log)."""
    config = write_project(tmp_path, images=3, model={"factory": "tests.test_ray:dying_cnn"},
                           runtime={"backend": "ray", "batch_size": 2, "max_retries": 0,
                                    "cpus_per_task": 1})
    result = run_cli("run", config)
    assert result.exit_code == 3, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: unit-00000 failed on Ray after 0 retries (ActorDiedError")
    assert "rerun with --resume to retry the rest" in line
    assert "Traceback" not in result.output
    units = tmp_path / "out" / "units"
    assert sorted(p.name for p in units.glob("unit-*.json")) == ["unit-00001.json"]
    assert "unit-00000" in (tmp_path / "out" / "error.log").read_text()


def test_an_address_where_no_cluster_answers_fails_fast(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """ray.init would retry there for minutes; the probe answers in one line, exit 2."""
    address = f"127.0.0.1:{closed_port()}"
    config = write_project(tmp_path, runtime={"backend": "ray", "ray_address": address})
    result = run_cli("run", config)
    assert result.exit_code == 2, result.output
    last = result.output.splitlines()[-1]
    assert last.startswith(f"error: runtime.ray_address '{address}': no Ray cluster answers "
                           "there"), result.output
    assert "ray start --head" in last
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{address}")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS 'ray://127\.0\.0\.1:\d+': no Ray"):
        check_reachable(*cluster_address(None, os.environ))
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        check_reachable("head-node", "runtime.ray_address")
    check_reachable("auto", "RAY_ADDRESS")  # Ray's own name: left to ray.init


def test_the_cluster_address_comes_from_the_config_then_the_environment() -> None:
    assert cluster_address("h:1", {"RAY_ADDRESS": "e:2"}) == ("h:1", "runtime.ray_address")
    assert cluster_address(None, {"RAY_ADDRESS": "e:2"}) == ("e:2", "RAY_ADDRESS")
    assert cluster_address(None, {}) == (None, "")


def test_gpus_asked_of_a_cluster_without_any_is_one_line(ray_env: None,
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


def test_a_refused_connection_names_ray_auth_mode(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A head started with token auth refuses a driver without RAY_AUTH_MODE=token: ray.init
    logs InvalidAuthToken and raises ConnectionError (seen with Ray 2.60 and `ray start`)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"

        def refused(**kwargs: object) -> None:
            assert kwargs["address"] == address
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

        monkeypatch.setattr(ray, "init", refused)
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        result = run_cli("run", write_project(tmp_path, runtime={"backend": "ray"}))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == (
        f"error: RAY_ADDRESS '{address}': cannot connect (Failed to connect to Ray cluster at "
        f"{address}); a cluster started with token authentication (InvalidAuthToken in Ray's "
        "log above) needs export RAY_AUTH_MODE=token")

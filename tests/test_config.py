"""Config validation: defaults, YAML paths in errors, overrides, the starter config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from saliencycheck.config import Config, load_config, parse_config
from saliencycheck.errors import ConfigError
from saliencycheck.starter import starter_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_empty_config_gives_documented_defaults(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ""))
    cfg = loaded.config
    assert cfg.tests.cascading.enabled and not cfg.tests.independent.enabled
    assert cfg.tests.init == "reset" and cfg.tests.target_on_randomized == "original"
    assert cfg.metrics == ["spearman_abs", "spearman", "ssim", "hog", "pearson"]
    assert cfg.postprocess.percentile == 99.0 and cfg.postprocess.abs_reduction == "sum_abs"
    assert cfg.images.target == "predicted"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("tests:\n  cascading:\n    order: sideways\n", "tests.cascading.order"),
        ("model:\n  nmae: resnet18\n", "model.nmae"),
        ("metrics: [spearman, cosine]\n", "metrics[1]"),
        ("runtime:\n  batch_size: 0\n", "runtime.batch_size"),
        ("images:\n  target: -3\n", "images.target"),
        ("unknown_section: 1\n", "unknown_section"),
        ("methods: [gradient]\ntests:\n  completeness: {enabled: true}\n",
         "tests.completeness: it checks gradient_x_input, integrated_gradients, lrp, deeplift, "
         "and methods has none of them"),
    ],
)
def test_errors_name_file_and_yaml_path(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "c.yaml" in message and where in message
    assert "\n" not in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.yaml: line \d: expected"):
        load_config(write(tmp_path, "model:\n  name: [resnet\n"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_yaml_is_parsed_safely(tmp_path: Path) -> None:
    # A python tag must not be constructed (safe_load); it is a config error, not code execution.
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "model: !!python/object/apply:os.system ['echo hi']\n"))


def test_overrides_apply_dotted_paths(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, "runtime:\n  device: cpu\n"),
                         ["runtime.batch_size=3", "tests.independent.enabled=true",
                          "metrics=[ssim]"])
    assert loaded.config.runtime.batch_size == 3
    assert loaded.config.tests.independent.enabled
    assert loaded.config.metrics == ["ssim"]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(write(tmp_path, ""), ["runtime.batch_size"])


def test_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, "images:\n  path: imgs\n"))
    assert loaded.resolve(loaded.config.images.path) == tmp_path.resolve() / "imgs"


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> None:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(Config)


def test_starter_config_round_trips_to_the_defaults() -> None:
    text = starter_config()
    assert text.count("#") > 40  # commented
    data = yaml.safe_load(text)
    cfg = parse_config(data)
    default = Config()
    assert cfg.tests == default.tests and cfg.runtime == default.runtime
    assert cfg.metrics == default.metrics
    assert [m if isinstance(m, str) else m.name for m in cfg.methods][:2] == [
        "gradient", "gradient_x_input"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from saliencycheck.runner.setup import resolve_methods

    loaded = load_config(path)
    resolve_methods(loaded.config)  # method parameters too (no model needed)


def test_config_reference_is_current() -> None:
    """docs/config.md's table is generated from the schema; regenerate it when a field
    changes."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    table = subprocess.run([sys.executable, str(root / "scripts" / "config_reference.py")],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert table in (root / "docs" / "config.md").read_text()

"""The Python API: a model in memory, checked by the same engine as the CLI."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import saliencycheck as sc
from saliencycheck.cli import app
from tests.test_cli import tiny_cnn

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "sample_images" / "digits"
GOLDEN = REPO / "tests" / "golden" / "layer_options.yaml"
REPORTS = ["report.csv", "summary.csv", "stages.csv", "verdicts.csv"]


class TwoPath(nn.Module):
    """A model no builder makes: two branches added, its own ReLU module called twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 6, 3, padding=1)
        self.right = nn.Conv2d(6, 6, 1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.relu(self.left(x) + self.right(x))
        return self.head(x.mean(dim=(2, 3)))


def small_check(model: nn.Module, **kwargs: object) -> sc.Result:
    options = {"image_settings": {"size": 24, "mean": [0.5] * 3, "std": [0.5] * 3, "limit": 3},
               "methods": ["gradient", sc.method("integrated_gradients", steps=4),
                           "guided_backprop"],
               "tests": {"cascading": {"granularity": "layer"}, "random_logit": {"enabled": True}},
               "metrics": ["spearman_abs", "ssim"], "device": "cpu",
               "runtime": {"batch_size": 2, "bootstrap": 100},
               "thresholds": {"cascading": {"metric": "spearman_abs", "max": 0.5}},
               "output_settings": {"figures": False}}
    images = kwargs.pop("images", DIGITS)
    return sc.check(model, images, **{**options, **kwargs})


def test_a_model_in_memory_is_checked_and_left_as_it_was() -> None:
    model = TwoPath().train()  # in training mode, as a notebook may leave it
    model.left.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    result = small_check(model)
    assert model.training and not model.left.weight.requires_grad
    assert model.stem.weight.requires_grad and model.stem.weight.device.type == "cpu"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    report = result.to_pandas()
    assert set(report["method"]) == {"gradient", "integrated_gradients", "guided_backprop",
                                     "random_map"}  # the methods and the random-map control
    assert set(report["test"]) >= {"cascading", "random_logit"}
    # layer granularity: the model's three convolutions and its head, one stage each
    stages = result.stages()
    cascade = list(stages[stages["test"] == "cascading"]["stage"])
    assert cascade == ["trained", "head", "right", "left", "stem"]
    assert {(v.method, v.test) for v in result.verdicts} == {
        (m, "cascading") for m in ("gradient", "integrated_gradients", "guided_backprop")}
    assert result.passed == all(v.verdict != "FAIL" for v in result.verdicts)
    summary = result.summary()
    assert {"mean", "ci_low", "ci_high", "floor"} <= set(summary.columns)


def test_the_api_and_the_cli_write_the_same_reports(tmp_path: Path) -> None:
    """One engine: the golden layer_options config through the CLI, and its sections as
    keyword arguments with the model its factory builds."""
    runner = CliRunner().invoke(app, ["run", str(GOLDEN), "-o", str(tmp_path / "cli")])
    assert runner.exit_code in (0, 1), runner.output
    config = yaml.safe_load(GOLDEN.read_text())
    model, images = tiny_cnn(config.pop("model")["num_classes"]), config.pop("images")
    path = (GOLDEN.parent / images.pop("path")).resolve()
    result = sc.check(model, path, image_settings=images, methods=config.pop("methods"),
                      tests=config.pop("tests"), metrics=config.pop("metrics"),
                      device="cpu", seed=config["runtime"].pop("seed"),
                      output_settings=config.pop("output"), **config)
    saved = result.save(tmp_path / "api")
    for name in REPORTS:
        assert (saved / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    assert result.passed == (runner.exit_code == 0)


def test_bad_arguments_raise_the_clis_one_line_messages() -> None:
    with pytest.raises(sc.ConfigError, match=r"^check\(\): .*runtime\.devise: unknown key "
                                             r"'devise' \(did you mean 'device'\?\)"):
        small_check(TwoPath(), runtime={"devise": "cpu"})
    with pytest.raises(sc.ConfigError, match=r"metrics\[0\]: 'spearmann' is not one of"):
        small_check(TwoPath(), metrics=["spearmann"])
    with pytest.raises(sc.SaliencyCheckError, match="must be a torch.nn.Module"):
        sc.check("resnet18", DIGITS)
    with pytest.raises(sc.SaliencyCheckError, match="runtime.backend: 'ray' workers build"):
        small_check(TwoPath(), runtime={"backend": "ray"})


def test_save_refuses_a_folder_of_someone_elses_files(tmp_path: Path) -> None:
    result = small_check(TwoPath())
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "draft.tex").write_text("mine")
    with pytest.raises(sc.SaliencyCheckError, match="draft.tex|not empty|--force"):
        result.save(tmp_path / "paper")
    saved = result.save(tmp_path / "new")
    with (saved / "report.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(result.to_pandas())
    assert (tmp_path / "paper" / "draft.tex").read_text() == "mine"


def test_an_output_folder_of_someone_elses_files_is_refused_before_any_work(
        tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(sc.ConfigError, match=r"^check\(\): output: .* is not empty \(notes.txt\)"
                                             r".*set output= to a new or empty folder, or pass "
                                             r"force=True"):
        small_check(TwoPath(), output=tmp_path)
    result = small_check(TwoPath(), output=tmp_path, force=True)
    assert result.folder == tmp_path.resolve()
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "report.csv").is_file()


def digits_as_tensors(count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The first digits as saliencycheck preprocesses them (size 24, mean/std 0.5), and their
    labels from labels.csv."""
    from saliencycheck.data import ImageRef, load_images
    from saliencycheck.models import Preprocessing

    paths = sorted(p for p in DIGITS.iterdir() if p.suffix == ".png")[:count]
    records, _ = load_images([ImageRef(p.stem, p) for p in paths],
                             Preprocessing(size=24, mean=(0.5,) * 3, std=(0.5,) * 3))
    with (DIGITS / "labels.csv").open(newline="") as fh:
        table = {row["image"]: int(row["label"]) for row in csv.DictReader(fh)}
    labels = [table[p.name] for p in paths]
    return torch.stack([r.tensor for r in records]), torch.tensor(labels)


def means(result: sc.Result) -> list[tuple]:
    """The summary's means, but random logit's: its other class is drawn per image id, and
    files and tensors give the same images other ids."""
    summary = result.summary()
    summary = summary[summary["test"] != "random_logit"]
    return sorted(zip(summary["method"], summary["test"], summary["stage_index"],
                      summary["metric"], summary["mean"].round(12).astype(str)))


def test_tensors_and_dataloaders_give_the_scores_of_the_image_files() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    inputs, labels = digits_as_tensors()
    from_files = small_check(TwoPath())
    assert means(small_check(TwoPath(), images=inputs)) == means(from_files)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=2)
    with_labels = small_check(TwoPath(), images=loader, targets="label")
    by_tensor = small_check(TwoPath(), images=list(inputs), targets=labels)
    assert means(with_labels) == means(by_tensor)
    report = with_labels.to_pandas()
    trained = report[(report["stage_index"] == 0)].drop_duplicates("image")
    assert sorted(trained["target"]) == sorted(labels.tolist())  # the labels were explained
    assert list(trained.sort_values("image")["image"]) == ["image0", "image1", "image2"]


def test_an_image_tensor_with_nan_is_skipped_and_listed() -> None:
    inputs, _ = digits_as_tensors()
    inputs[1, 0, 3, 3] = float("nan")
    result = small_check(TwoPath(), images=inputs)
    assert set(result.to_pandas()["image"]) == {"image0", "image2"}
    with (result.folder / "skipped.csv").open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert "image1" in row["path"] and "NaN" in row["reason"]


@pytest.mark.parametrize(("images", "targets", "message"), [
    (torch.zeros(24, 24), "predicted", r"\(C, H, W\) or \(N, C, H, W\); got Tensor \(24, 24\)"),
    (torch.zeros(0, 3, 24, 24), "predicted", "images is empty"),
    (torch.zeros(2, 3, 24, 24), torch.tensor([1, 2, 3]), r"targets must be an \(2,\) tensor"),
    (DIGITS, torch.tensor([1]), "targets as a tensor needs images as tensors"),
    (42, "predicted", "images must be a path, a tensor, a Dataset or a DataLoader, not int"),
])
def test_bad_images_and_targets_are_one_line_errors(images: object, targets: object,
                                                    message: str) -> None:
    with pytest.raises(sc.SaliencyCheckError, match=message):
        small_check(TwoPath(), images=images, targets=targets)


def captum_input_x_gradient(model: nn.Module, inputs: torch.Tensor,
                            targets: torch.Tensor) -> torch.Tensor:
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(inputs, target=targets)


def test_a_captum_method_passed_as_a_function_scores_as_saliencychecks_own() -> None:
    result = small_check(TwoPath(), methods=["gradient_x_input", captum_input_x_gradient,
                                             lambda model, x, t: x * 0 + 1],
                         thresholds={})
    summary = result.summary()
    ours = summary[summary["method"] == "gradient_x_input"]
    captum = summary[summary["method"] == "captum_input_x_gradient"]
    assert len(captum) == len(ours) > 0
    assert captum["mean"].to_numpy() == pytest.approx(ours["mean"].to_numpy(), abs=1e-6,
                                                      nan_ok=True)
    assert "custom2" in set(summary["method"])  # a lambda gets a label by its position


def test_figures_come_back_as_matplotlib_figures_and_the_result_shows_as_html() -> None:
    import matplotlib
    from matplotlib.figure import Figure

    backend = matplotlib.get_backend()
    result = small_check(TwoPath(), output_settings={"figures": True, "figure_images": 2})
    assert matplotlib.get_backend() == backend  # a notebook's backend is left alone
    curves = result.plot_curves("cascading")
    assert isinstance(curves, Figure)
    first = curves.axes[0]
    assert first.get_title() == "spearman_abs"
    assert sorted(line.get_label() for line in first.get_lines() if line.get_marker() == "o") \
        == ["gradient", "guided_backprop", "integrated_gradients", "random_map (control)"]
    grid = result.plot_grid(image=1, test="cascading")
    assert isinstance(grid, Figure) and "cascading" in grid.axes[0].get_title()
    with pytest.raises(sc.SaliencyCheckError, match="no maps kept for image 2"):
        result.plot_grid(image=2)  # only the first two images keep their maps
    with pytest.raises(sc.SaliencyCheckError, match="'independent' did not run"):
        result.plot_curves("independent")
    html = result._repr_html_()
    assert html.count("<tr style=") == len(result.verdicts) == 3
    assert all(v.verdict in html for v in result.verdicts) and "spearman_abs" in html


@pytest.mark.slow
def test_the_notebook_example_reproduces_the_quickstarts_cascading_result(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import runpy

    monkeypatch.setenv("SALIENCYCHECK_CACHE", str(REPO / ".cache"))  # the tests' trained model
    example = runpy.run_path(str(REPO / "examples" / "notebook_quickstart.py"))
    verdicts = {v.method: v.verdict for v in example["result"].verdicts}
    # the paper's finding: the gradient changes under randomization, guided backprop does not
    assert verdicts["gradient"] == "PASS" and verdicts["guided_backprop"] == "FAIL"
    assert example["result"].passed
    assert "gate: passed" in capsys.readouterr().out


def test_the_readmes_python_api_example_runs_as_written(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # its result.save("runs/notebook") lands here
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "notebook" / "report.csv").is_file()
    assert namespace["result"].verdicts


def reinitialised(seed: int) -> TwoPath:
    model = TwoPath()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def test_label_randomization_with_models_in_memory_equals_their_checkpoints(
        tmp_path: Path) -> None:
    random_labels, control = reinitialised(1), reinitialised(2)
    torch.save(random_labels.state_dict(), tmp_path / "random.pt")
    torch.save(control.state_dict(), tmp_path / "control.pt")
    tests = {"cascading": {"enabled": False}}
    in_memory = small_check(TwoPath(), tests={**tests, "label_randomization": {
        "model": random_labels, "control": control}}, thresholds={})
    from_files = small_check(TwoPath(), tests={**tests, "label_randomization": {
        "checkpoint": str(tmp_path / "random.pt"),
        "control_checkpoint": str(tmp_path / "control.pt")}}, thresholds={})
    assert means(in_memory) == means(from_files)
    stages = set(in_memory.summary()["stage"])
    assert {"random_labels", "control"} <= stages
    with pytest.raises(sc.SaliencyCheckError, match=r"label_randomization\.model: its logits "
                                                    r"have shape \(1, 4\)"):
        wrong = TwoPath()
        wrong.head = nn.Linear(6, 4)
        small_check(TwoPath(), tests={"label_randomization": {"model": wrong}})


def test_a_function_passed_as_a_method_is_not_kept_after_its_run() -> None:
    from saliencycheck.methods import custom

    small_check(TwoPath(), methods=[captum_input_x_gradient], thresholds={})
    assert not [n for n in custom._FUNCTIONS if "captum_input_x_gradient" in n]

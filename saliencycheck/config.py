"""The run configuration: one pydantic model per YAML section, validated before anything runs.

Config errors surface before a model is built. The metric names are the metrics registry's
(``saliencycheck.metrics``), read, not copied. Every field carries a description:
`saliencycheck init` and the reference in docs/config.md are generated from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from saliencycheck.checks import CHECKS, get_check
from saliencycheck.checks.cascading import CascadingConfig
from saliencycheck.checks.completeness import CompletenessConfig
from saliencycheck.checks.entropy_mprt import EntropyMprtConfig
from saliencycheck.checks.independent import IndependentConfig
from saliencycheck.checks.input_invariance import InputInvarianceConfig
from saliencycheck.checks.label_randomization import LabelRandomizationConfig, TrainRecipe
from saliencycheck.checks.random_logit import RandomLogitConfig
from saliencycheck.checks.random_map import controlled
from saliencycheck.checks.smooth_mprt import SmoothMprtConfig
from saliencycheck.complexity import ENTROPY_RISE
from saliencycheck.errors import ConfigError, first_line
from saliencycheck.metrics import METRICS
from saliencycheck.postprocess import PostprocessOptions
from saliencycheck.results import CI_LEVEL
from saliencycheck.sections import MAX_SAMPLES, MAX_STEPS, Section, Threshold, at_most
from saliencycheck.suggest import did_you_mean, not_one_of

# The sections of the checks, re-exported: they are defined with their check.
__all__ = ["MAX_SAMPLES", "MAX_STEPS", "ENTROPY_RISE", "CascadingConfig", "CompletenessConfig",
           "EntropyMprtConfig", "IndependentConfig", "InputInvarianceConfig",
           "LabelRandomizationConfig", "RandomLogitConfig", "SmoothMprtConfig", "Threshold",
           "TrainRecipe", "at_most"]

MAX_YAML_NODES = 100_000  # values a config may expand to, aliases counted at each use
# Upper bounds that catch a typo (an extra zero) before hours of compute; generous for real use.
MAX_REPEATS = 100
MAX_BOOTSTRAP = 100_000


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data only: no Python objects, so no code runs) that
    also refuses a key given twice in one mapping (YAML silently keeps the last) and a document
    whose aliases expand to more than ``MAX_YAML_NODES`` values ("billion laughs": a 1 KB file
    of nested aliases that expands to 10^9 values once validated or printed)."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (first on line {earlier}); remove one "
                    "(YAML would silently keep the last)", problem_mark=key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    """A node's keys and values, or items; none for a scalar."""
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that expands to more than ``MAX_YAML_NODES`` values or holds a
    recursive alias. An alias is the node it names, shared; sizes are summed once per node
    (depth first, without recursion), so even a bomb is checked in time linear in its text."""
    on_path = -1
    size: dict[int, int] = {}  # id(node) -> values it expands to; on_path while being summed
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_summed = stack.pop()
        if children_summed:
            size[id(node)] = 1 + sum(size[id(child)] for child in _children(node))
            if size[id(node)] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    problem=f"its aliases expand to more than {MAX_YAML_NODES:,} values (an "
                    "alias bomb?); a config needs far fewer: write the values out or nest "
                    "fewer aliases", problem_mark=node.start_mark)
        elif size.get(id(node)) == on_path:
            raise yaml.composer.ComposerError(
                problem="a recursive alias (a value that contains itself); write the values "
                "out", problem_mark=node.start_mark)
        elif id(node) not in size:
            size[id(node)] = on_path
            stack.append((node, True))
            stack += [(child, False) for child in _children(node)]


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with `StrictLoader`'s checks. Raises ``yaml.YAMLError``, or
    ``RecursionError`` for a value nested thousands of levels deep."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class ModelConfig(Section):
    name: str = Field(
        "resnet18",
        description="A torchvision.models builder name, e.g. resnet50, vgg16, inception_v3.",
    )
    weights: str | None = Field(
        None,
        description=(
            "A torchvision weights name for the builder (DEFAULT, IMAGENET1K_V1, ...), or a path "
            "to a local checkpoint: a state_dict, or a dict holding one under 'state_dict' or "
            "'model' ('module.' prefixes are stripped; loaded with weights_only=True). "
            "Empty: random initialisation (only useful for testing)."
        ),
    )
    num_classes: int | None = Field(
        None, ge=1, description="Number of output classes; default: the builder's (1000)."
    )
    factory: str | None = Field(
        None,
        description=(
            "Optional 'package.module:function' returning an nn.Module, for a custom model. "
            "Called with factory_kwargs (and num_classes when set). Code runs only because you "
            "name it here."
        ),
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the factory."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the torchvision builder's model class, e.g. "
        "{image_size: 64} for a ViT at another resolution or {dropout: 0.0}; an unknown one is "
        "an error listing those it takes.",
    )

    @property
    def label(self) -> str:
        """The model as messages and figures name it: the builder, or the factory function."""
        return self.factory.rpartition(":")[2] if self.factory else self.name

    @field_validator("kwargs")
    @classmethod
    def _not_set_elsewhere(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, fix in (("num_classes", "set model.num_classes instead"),
                         ("weights", "set model.weights instead"),
                         ("progress", "saliencycheck sets it; remove it")):
            if key in value:
                raise ValueError(f"{key}: {fix}")
        return value

    @model_validator(mode="after")
    def _kwargs_for_builders(self) -> ModelConfig:
        if self.kwargs and self.factory:
            raise ValueError("kwargs go to a torchvision builder; a factory takes "
                             "factory_kwargs")
        return self


class ImagesConfig(Section):
    path: str = Field(
        "sample_images/digits",
        description=(
            "A folder (searched recursively for .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp), a glob "
            "pattern, or a text file listing one image path per line. Relative paths are "
            "resolved against the config file's folder."
        ),
    )
    size: int | None = Field(
        None,
        ge=8,
        description=(
            "Images are resized (shorter side) and centre-cropped to size x size (8 to 4096). "
            "Default: the named torchvision weights' own preprocessing, else 224."
        ),
    )
    mean: tuple[float, float, float] | None = Field(
        None,
        description="Per-channel normalisation mean. Default: the weights' own, else ImageNet's.",
    )
    std: tuple[float, float, float] | None = Field(
        None,
        description="Per-channel normalisation std. Default: the weights' own, else ImageNet's.",
    )
    target: Literal["predicted", "label"] | Annotated[int, Field(ge=0)] = Field(
        "predicted",
        description=(
            "The class each map explains: 'predicted' (the trained model's top class), 'label' "
            "(from the labels CSV), or one class index for every image."
        ),
    )
    labels: str | None = Field(
        None,
        description=(
            "CSV with columns image,label (image: the file name or the path relative to "
            "images.path). Needed for target: label."
        ),
    )
    limit: int | None = Field(None, ge=1, description="Use at most this many images (sorted).")

    @field_validator("size")
    @classmethod
    def _not_huge(cls, value: int | None) -> int | None:
        if value is not None and value > 4096:
            gib = 3 * value * value * 4 / 2**30
            raise ValueError(
                f"{value} px is too large: at most 4096, since every image, map and "
                f"activation holds size x size values (one {value}x{value} RGB input alone is "
                f"{gib:.3g} GiB as float32); give a smaller size, e.g. 224"
            )
        return value


class MethodEntry(Section):
    """One attribution method with its parameters (validated against the method's own schema)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(description="A registered method name (see `saliencycheck methods`).")
    label: str | None = Field(
        None, description="Name used in reports; default the method name (must be unique)."
    )


class PostprocessConfig(Section):
    abs_reduction: Literal["sum_abs", "abs_sum", "max_abs"] = Field(
        PostprocessOptions.abs_reduction,
        description=(
            "Channel reduction of the absolute map (original recipe: sum of absolute values)."
        ),
    )
    signed_reduction: Literal["sum", "mean"] = Field(
        PostprocessOptions.signed_reduction,
        description="Channel reduction of the signed (diverging) map.",
    )
    percentile: float = Field(
        PostprocessOptions.percentile, gt=0, le=100,
        description="Percentile used to scale and clip maps (original: 99).",
    )
    ssim_data_range: float = Field(
        PostprocessOptions.ssim_data_range, gt=0,
        description="SSIM's data range: 1 for maps in [0, 1] (correct); the original "
        "code left it unset, so scikit-image assumed 2 (preset adebayo2018).",
    )


class RuntimeConfig(Section):
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'.")
    batch_size: int = Field(
        16, ge=1, description="Images per work unit; their passes are batched together."
    )
    chunk_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Max rows (images x integration steps x noise samples) per "
        "forward/backward; 'auto': from free GPU memory (measured), 128 on the CPU.",
    )
    device_memory_gib: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="Most CUDA memory this run may hold per device, in GiB (default: no cap). "
        "PyTorch's allocator enforces it; a pass that would exceed it is halved, as after an "
        "out-of-memory error, and chunk_size auto sizes passes to it. No effect on the CPU.",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds randomization and noise (local "
                      "generators only); 0 to 2**32 - 1.")
    repeats: int = Field(
        1, ge=1,
        description="Repeat every randomization with this many seeds (seed, seed+1000, ...): "
        "the randomization stages, the random-network floor and the random logit's class; "
        "confidence intervals then cover images and seeds. Label randomization trains one "
        "random-label model (its interval covers images).",
    )
    ci_level: float = Field(CI_LEVEL, gt=0, lt=1,
                            description="Confidence level of the intervals.")
    bootstrap: int = Field(
        2000, ge=100, description="Bootstrap resamples (over images x repeats) per interval."
    )

    prefix_cache: bool = Field(
        True,
        description=(
            "Reuse the trained model's activations below a stage's first randomized layer "
            "instead of recomputing them; turn off for models whose control flow depends on "
            "the input."
        ),
    )
    affine_stem: bool = Field(
        True,
        description=(
            "Sum integrated-gradients and SmoothGrad rows' gradients at the output of the "
            "model's affine input layers (e.g. ResNet's conv1 and bn1) and pull back one row "
            "per image through them, instead of one per integration step or noise sample."
        ),
    )
    reuse_host_memory: bool = Field(
        True,
        description=(
            "While units run, keep freed host memory for the next pass instead of returning "
            "it to the system (glibc's allocator; no effect elsewhere): saves the page faults "
            "of fresh activations (ResNet-18 at 224x224 on a CPU: a third of each pass)."
        ),
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description=(
            "Forward passes under autocast in bf16/fp16 (gradients stay fp32): faster, less "
            "exact; the run then reports each method's Spearman against fp32 maps."
        ),
    )
    backend: Literal["local", "ray"] = Field(
        "local",
        description="Where work units run: 'local' (this process; with several visible GPUs "
        "and device auto, one worker process per GPU) or 'ray' (Ray workers on a local or "
        "existing cluster; pip install 'saliencycheck[ray]').",
    )
    ray_address: str | None = Field(
        None,
        description="With backend ray: the cluster to join (e.g. 'auto', or "
        "'ray://head:10001'); default the RAY_ADDRESS environment variable, else Ray starts "
        "on this machine.",
    )
    gpus_per_task: float | None = Field(
        None, ge=0,
        description="With backend ray: GPUs each Ray worker holds (fractions share a GPU, e.g. "
        "0.5); default 1 when the cluster has GPUs and device is not cpu, else 0.",
    )
    cpus_per_task: float = Field(
        1.0, gt=0, description="With backend ray: CPUs each Ray worker holds."
    )
    max_retries: int = Field(
        2, ge=0,
        description="With backend ray: how often a failed unit (a crashed worker, a lost node, "
        "a CUDA or I/O error) is retried before the run stops.",
    )

    @field_validator("repeats")
    @classmethod
    def _few_repeats(cls, value: int) -> int:
        return at_most(value, MAX_REPEATS, typical="typical: 1 to 5; each repeat runs every "
                       "randomization again")

    @field_validator("bootstrap")
    @classmethod
    def _few_resamples(cls, value: int) -> int:
        return at_most(value, MAX_BOOTSTRAP, typical="typical: 1,000 to 10,000; more only "
                       "slows the intervals down")


class OutputConfig(Section):
    dir: str = Field("runs/latest", description="Output folder (relative to the config file).")

    @field_validator("dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty: it would mean the config file's own folder, among your "
                             "files; give a folder, e.g. runs/latest")
        return value
    figures: bool = Field(True, description="Write PNG figures.")
    html: bool = Field(True, description="Write report.html: one self-contained page (the "
                       "verdicts first, then the evidence and the provenance; figures "
                       "embedded, nothing fetched from elsewhere).")
    figure_images: int = Field(
        4, ge=0, description="How many images get per-image stage grids (the first ones)."
    )
    save_maps: bool = Field(
        False, description="Save raw maps as maps/<image>.npz (keys test/method/stage_index)."
    )


def _check_fields(*, baselines: bool) -> dict[str, Any]:
    """The fields of the registered checks (``saliencycheck.checks``), in registration order:
    a test's section under tests:, a baseline's switch under baselines:."""
    fields: dict[str, Any] = {}
    for check in CHECKS:
        if check.baseline != baselines:
            continue
        if baselines:
            fields[check.config_key] = (bool, Field(check.default_on,
                                                    description=check.description))
        elif check.optional:
            fields[check.config_key] = (check.section | None,
                                        Field(None, description=check.description))
        else:
            fields[check.config_key] = (check.section, Field(default_factory=check.section,
                                                             description=check.description))
    return fields


TestsConfig = create_model(
    "TestsConfig", __base__=Section, __doc__="The sanity tests and how they randomize.",
    **_check_fields(baselines=False),
    init=(Literal["reset", "normal", "shuffle"], Field(
        "reset",
        description=(
            "How randomized parameters are drawn: 'reset' (each module's own initializer), "
            "'normal' (truncated normal with init_std), 'shuffle' (permute trained values)."
        ),
    )),
    init_std=(float, Field(0.1, gt=0, description="Standard deviation for init: normal.")),
    reset_running_stats=(bool, Field(
        False, description="Also reset BatchNorm running statistics of randomized blocks.")),
    target_on_randomized=(Literal["original", "recompute"], Field(
        "original",
        description=(
            "Class explained on randomized models: the trained model's ('original', as Quantus) "
            "or the randomized model's own top class ('recompute', as the paper's code)."
        ),
    )),
)
BaselinesConfig = create_model(
    "BaselinesConfig", __base__=Section, __doc__="Reference scores computed beside the tests.",
    **_check_fields(baselines=True))
# The metrics are the registry's (saliencycheck.metrics), in registration order: one list.
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]
JudgedTest = Literal[tuple(c.name for c in CHECKS if not c.baseline and c.thresholds)]  # type: ignore[valid-type]


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    # The original code's choices (REFERENCE.md §1-3): the class recomputed on every randomized
    # model, SSIM with scikit-image's old float data range of 2.
    "adebayo2018": {"tests": {"target_on_randomized": "recompute"},
                    "postprocess": {"ssim_data_range": 2.0}},
}


class Config(Section):
    preset: Literal["default", "adebayo2018"] = Field(
        "default",
        description="'adebayo2018': the original code's choices (target_on_randomized: "
        "recompute, ssim_data_range: 2) where the config does not set them; 'default': the "
        "corrected ones.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model under test.")
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="Input images.")
    methods: list[str | MethodEntry] = Field(
        default_factory=lambda: ["gradient", "guided_backprop"],
        min_length=1,
        description="Attribution methods: names, or {name: ..., <params>} entries.",
    )
    tests: TestsConfig = Field(  # type: ignore[valid-type]
        default_factory=TestsConfig, description="Sanity checks to run.")
    metrics: list[MetricName] = Field(
        default_factory=lambda: list(METRICS),
        min_length=1,
        description="Similarity metrics between the trained and randomized models' maps.",
    )
    postprocess: PostprocessConfig = Field(
        default_factory=PostprocessConfig, description="Map normalisation before comparison."
    )
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="Device and batching."
    )
    output: OutputConfig = Field(default_factory=OutputConfig, description="What is written where.")
    baselines: BaselinesConfig = Field(  # type: ignore[valid-type]
        default_factory=BaselinesConfig, description="Reference scores shown next to the tests'."
    )
    thresholds: dict[JudgedTest, Threshold] = Field(
        default_factory=dict,
        description="Per test, the verdict rule: e.g. {cascading: {metric: spearman, stage: "
        "final, max: 0.25}}. Tests without one get no verdict.",
    )
    fail_on: Literal["all", "none"] | list[str] = Field(
        "all",
        description="Methods (labels) whose FAIL makes `run` exit with code 1: a list, 'all' "
        "or 'none'.",
    )

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each metric may be listed once")
        return value

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """A preset fills the keys it names unless the config sets them itself."""
        preset = data.get("preset") if isinstance(data, dict) else None
        if not isinstance(preset, str) or preset not in PRESETS:
            return data
        merged = dict(data)
        for section, values in PRESETS[preset].items():
            given = merged.get(section) or {}
            if isinstance(given, dict):
                merged[section] = {**values, **given}
        return merged

    @model_validator(mode="after")
    def _thresholds_match_the_run(self) -> Config:
        judged_only = {metric: check for check in CHECKS for metric in check.judged_metrics or ()}
        for test, threshold in self.thresholds.items():
            check = get_check(test)
            if not check.enabled(self):
                raise ValueError(f"thresholds.{test}: the {test} test does not run; enable it "
                                 "under tests: or remove the threshold")
            if threshold.max_above_floor is not None and not check.against_floor:
                raise ValueError(f"thresholds.{test}.max_above_floor: the random-network floor "
                                 f"scores plain maps, not {test}'s; use max: (or min:) there")
            if threshold.max_above_floor is not None and not self.baselines.random_floor:
                raise ValueError(f"thresholds.{test}.max_above_floor needs the random-network "
                                 "floor; set baselines.random_floor: true or use max:")
            if threshold.max_above_control is not None and not controlled(check):
                raise ValueError(f"thresholds.{test}.max_above_control: the random-map control "
                                 "is scored in cascading and independent only; use max: there")
            if threshold.max_above_control is not None and not self.baselines.random_map:
                raise ValueError(f"thresholds.{test}.max_above_control needs the random-map "
                                 "control; set baselines.random_map: true or use max:")
            # a test judged by a score of its own (eMPRT's entropy rise) by that score only
            owner = check if check.judged_metrics else judged_only.get(threshold.metric)
            if owner is not None and (owner is not check
                                      or threshold.metric not in check.judged_metrics):
                metric = owner.judged_metrics[0]
                raise ValueError(f"thresholds.{test}.metric: {owner.name} is judged by "
                                 f"{metric} and only it; use {metric} there and a "
                                 "similarity metric elsewhere")
            if owner is None and threshold.metric not in self.metrics:
                raise ValueError(f"thresholds.{test}.metric: {threshold.metric!r} is not "
                                 f"computed; add it to metrics: {list(self.metrics)}")
        return self

    @model_validator(mode="after")
    def _checks_agree(self) -> Config:
        for check in CHECKS:
            check.validate(self)
        return self


class LoadedConfig(BaseModel):
    """A validated config together with the file it came from (paths resolve against it)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    config: Config
    source: Path

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path from the config relative to the config file's folder."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else (self.source.parent / candidate)


def format_location(loc: tuple[Any, ...]) -> str:
    """Render a pydantic error location as a YAML path: methods[1].steps, tests.cascading.order."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("str", "MethodEntry", "int", "literal['predicted','label']"):
            continue  # union branch names add nothing for the user
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds (also behind ``| None``), or None for plain values."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys a section accepts, for the section holding the last part of ``loc``."""
    model: type[BaseModel] | None = Config
    parts = list(loc[:-1])
    while parts and model is not None:
        field = model.model_fields.get(parts.pop(0))
        if field is None:
            return []
        if get_origin(field.annotation) is dict:  # thresholds.<test>: skip the key
            model = _section_class(get_args(field.annotation)[1])
            if parts:
                parts.pop(0)
        else:
            model = _section_class(field.annotation)
    return list(model.model_fields) if model is not None else []


def _explain(error: dict[str, Any]) -> str:
    """A pydantic error as one line for the user, with a did-you-mean for mistyped names."""
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        keys = _keys_at(tuple(error["loc"]))
        valid = f"; valid keys here: {', '.join(keys)}" if keys else ""
        return f"unknown key {key!r}{did_you_mean(key, keys)}{valid}"
    return not_one_of(error) or error["msg"].removeprefix("Value error, ")


def parse_config(data: Any, *, source: str | Path = "<config>") -> Config:
    """Validate a mapping into a `Config`; raise `ConfigError` naming file and YAML path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of sections")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = format_location(tuple(first["loc"]))
        message = _explain(first)
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        if not first["loc"]:  # a rule across sections: its message names the fields
            raise ConfigError(f"{source}: {message}{more}") from None
        raise ConfigError(f"{source}: {where}: {message}{more}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> LoadedConfig:
    """Read, override (`section.key=value`) and validate a YAML config file."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"{source}: config file not found; create one with `saliencycheck init`")
    try:
        data = parse_yaml(source.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}:{_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: values nested thousands of levels deep; a config needs a "
                          "few levels, check the brackets") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                          f"offset {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file "
                          f"({exc.strerror or exc}); make it readable by this user") from None
    data = apply_overrides(data if data is not None else {}, overrides or [], source=source)
    return LoadedConfig(config=parse_config(data, source=source), source=source.resolve())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as `` line N: problem`` (the line where the mark is known)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}:" if mark is not None else ""
    problem = getattr(exc, "problem", None) or "invalid YAML"
    return f"{where} {problem}"


def apply_overrides(data: Any, overrides: list[str], *, source: str | Path) -> Any:
    """Apply `a.b.c=value` overrides (value parsed as YAML, as the config file is) to a config
    mapping; a malformed one is a `ConfigError` naming the ``--set`` option."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = [part.strip() for part in key.split(".")]
        if not sep or not all(parts):
            raise ConfigError(
                f"--set {item!r}: expected section.key=value with no empty names, e.g. "
                "--set runtime.device=cpu"
            )
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or first_line(exc)
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote "
                              f"it, e.g. --set '{key}=\"text\"', or close its brackets"
                              ) from None
        except RecursionError:
            raise ConfigError(f"--set {item!r}: the value is nested thousands of levels "
                              "deep; check its brackets") from None
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data

"""The `saliencycheck` command line: thin Typer wrappers over the runner.

The only module that prints or chooses exit codes: 0 success, 1 a configured check failed,
2 bad usage / config / input (one line, no traceback), 3 internal error (one line; the
traceback goes to error.log, or to the terminal with --debug), 130 interrupted.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from saliencycheck.config import load_config
from saliencycheck.errors import SaliencyCheckError, first_line

app = typer.Typer(
    help="Sanity checks for saliency maps (Adebayo et al. 2018) from one YAML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
# Where an internal error's traceback is written: the output folder once a command knows it.
_error_log_dir: Path | None = None
OUTPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]


@app.callback()
def options(debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of an internal error instead of writing it "
        "to error.log (also: SALIENCYCHECK_DEBUG=1).")] = False) -> None:
    """Sanity checks for saliency maps (Adebayo et al. 2018) from one YAML config."""
    if debug:
        os.environ["SALIENCYCHECK_DEBUG"] = "1"


def fail(exc: SaliencyCheckError) -> typer.Exit:
    message = escape(str(exc))
    if exc.exit_code == 3:  # not the user's input: what the worker said goes to error.log
        message += f" (details in {_write_error_log()})"
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=exc.exit_code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@app.command()
def run(config: ConfigArg, overrides: SetOption = None,
        output: Annotated[Path | None, typer.Option("--output", "-o",
                          help="Output folder (overrides output.dir).")] = None,
        retrain: Annotated[bool, typer.Option(
            "--retrain", help="Train the label randomization models again instead of reusing "
            "the cached ones.")] = False,
        junit: Annotated[Path | None, typer.Option(
            "--junit", help="Also write the verdicts as JUnit XML to this file (for CI).")] = None,
        as_json: Annotated[bool, typer.Option(
            "--json", help="Print the verdicts as JSON on stdout (tables go to stderr).")] = False,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Keep the units already stored in the output folder and run only "
            "the rest; refused when they come from another config.")] = False,
        shard: Annotated[str | None, typer.Option(
            "--shard", metavar="I/N", help="Run only shard I of N (0-based) into the shared "
            "output folder, without a report (then `saliencycheck merge`). Default in a Slurm "
            "array job: from SLURM_ARRAY_TASK_ID, _MIN, _STEP and _COUNT.",
            show_default=False)] = None,
        ) -> None:
    """Run the configured sanity checks and write reports and figures.

    Exit code 1 when a method named in fail_on fails a test with a threshold."""
    from saliencycheck.runner import prepare, run_check
    from saliencycheck.runner.run import run_shard
    from saliencycheck.runner.shards import parse_shard, shard_from_env
    from saliencycheck.runner.store import check_writable

    if output is not None:
        overrides = [*(overrides or []), f"output.dir={output.resolve()}"]
    part = None
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        warnings.showwarning = _show_warning
        try:
            part = parse_shard(shard) if shard is not None else shard_from_env(os.environ)
            loaded = load_config(config, overrides)
            out = loaded.resolve(loaded.config.output.dir)
            check_writable(out, f"{loaded.source.name}: output.dir")
            _log_errors_in(out)
            with console.status("loading model and images"):
                setup = prepare(loaded)
            labels = ", ".join(m.label for m in setup.methods)
            stages = "; ".join(f"{t}: {len(s)} stages" for t, s in setup.stages.items())
            err_console.print(
                f"model {loaded.config.model.name} ({setup.weights_source}) on {setup.device}; "
                f"{len(setup.images)} image files; methods {labels}; {stages}", highlight=False)
            with _progress() as bar:
                task = bar.add_task("running", total=None)

                def advance(steps: int, total: int, text: str) -> None:
                    bar.update(task, advance=steps, total=total, description=text)

                if part is not None:
                    done = run_shard(setup, part, progress=advance, retrain=retrain)
                else:
                    result = run_check(setup, progress=advance, retrain=retrain, resume=resume)
        except SaliencyCheckError as exc:
            raise fail(exc) from None
        except OSError as exc:
            raise _output_failure(exc) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted:[/] finished work units are saved" + (
                "; run the shard again to finish it" if part is not None else
                " and the reports were written from them; --resume finishes the run"))
            raise typer.Exit(code=130) from None
    if part is not None:
        _print_shard(done)
        return
    _show_result(result, junit=junit, as_json=as_json)


def _log_errors_in(folder: Path) -> None:
    """Write an internal error's traceback to ``folder``/error.log, removing an earlier
    run's log so it never passes for this one's."""
    global _error_log_dir
    _error_log_dir = folder
    try:
        (folder / "error.log").unlink(missing_ok=True)
    except OSError:  # an unwritable folder is reported where it is written to
        pass


def _output_failure(exc: OSError) -> typer.Exit:
    """A full disk or an unwritable output folder: exit 2 with the fix; anything else is an
    internal error (re-raised)."""
    if exc.errno not in OUTPUT_ERRNOS:
        raise exc
    where = exc.filename or _error_log_dir or "the output folder"
    err_console.print(
        f"[bold red]error:[/] cannot write {escape(str(where))} ({escape(exc.strerror or '')}); "
        "free space or set output.dir (or -o) to a writable folder. The folder holds no "
        "complete report (run.json, written last, is absent); the units stored are kept: "
        "--resume (or merge) writes the report from them",
        highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _print_shard(done) -> None:  # noqa: ANN001
    """What a shard stored, and what is left to do."""
    out = done.output_dir.resolve()
    console.print(f"shard {done.shard}: {done.units_stored} of its {done.units_shard} units "
                  f"stored in {out / 'units'} ({done.units_run} run now)", highlight=False)
    if done.units_missing:
        console.print(f"{done.units_missing} units of the whole run are not stored yet; once "
                      f"every shard is done: saliencycheck merge {out}", highlight=False)
    else:
        console.print(f"every unit of the run is stored: saliencycheck merge {out}",
                      highlight=False)


def _show_result(result, *, junit: Path | None, as_json: bool) -> None:  # noqa: ANN001
    """Print what a run or merge found, write the JUnit file, exit 1 if the gate fails."""
    if result.units_resumed:
        err_console.print(f"resumed: {result.units_resumed} of {result.units_total} units were "
                          "already stored", highlight=False)
    if result.fidelity:
        shown = ", ".join(f"{label} {value:.3f}" for label, value in result.fidelity.items())
        err_console.print(f"[yellow]precision {result.precision}:[/] abs-Spearman of the trained "
                          f"model's maps against fp32 (first batch): {shown}", highlight=False)
    for path, reason in result.skipped:
        err_console.print(f"[yellow]warning:[/] skipped unreadable image {path}: {reason}",
                          highlight=False)
    invariance = result.input_invariance
    if invariance and not invariance["valid"]:
        err_console.print(f"[yellow]warning:[/] input invariance is invalid: "
                          f"{escape(invariance['reason'])}; its scores say nothing (flagged in "
                          "report.csv's note, INVALID where a threshold is set)",
                          highlight=False, soft_wrap=True)
    for test, stage in result.unchanged_stages:
        err_console.print(f"[yellow]warning:[/] {test} stage {stage} left the logits unchanged: "
                          "the randomized block does not reach the output, so its scores say "
                          "nothing (flagged in report.csv's note)", highlight=False)
    shown = err_console if as_json else console
    _print_summary(result, shown)
    if result.verdicts:
        _print_verdicts(result, shown)
    if junit is not None:
        from saliencycheck.verdicts import junit_xml

        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result.verdicts, result.failures), encoding="utf-8")
    if as_json:
        from saliencycheck.verdicts import verdicts_json

        typer.echo(verdicts_json(result.verdicts, result.failures))
    if result.failures:
        raise typer.Exit(code=1)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}", table_column=None), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                    transient=False)


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.2f}"


def _method_table(result, title: str, cell) -> Table:  # noqa: ANN001
    """Methods × metrics, each cell ``cell(method, metric)``."""
    table = Table(title=title, title_justify="left")
    table.add_column("method", no_wrap=True)
    for metric in result.metrics:
        table.add_column(metric, justify="right")
    for method in result.methods:
        table.add_row(method, *[cell(method, metric) for metric in result.metrics])
    return table


def _mean_cell(scores: dict) -> object:
    """A cell function showing ``scores[(method, metric)].mean`` ("-" when absent)."""
    return lambda method, metric: (_fmt(scores[(method, metric)].mean)
                                   if (method, metric) in scores else "-")


def _floor_cell(scores: dict) -> object:
    """Like :func:`_mean_cell`, with the distance above the random-network floor (Δ)."""
    def cell(method: str, metric: str) -> str:
        row = scores.get((method, metric))
        if row is None:
            return "-"
        if math.isnan(row.above_floor):
            return _fmt(row.mean)
        return f"{_fmt(row.mean)}\n[dim]Δ{_fmt(row.above_floor)}[/]"  # two lines: stays narrow
    return cell


def _print_summary(result, console: Console) -> None:  # noqa: ANN001
    from saliencycheck.runner.setup import ENTROPY_TEST, LABEL_TEST
    from saliencycheck.verdicts import EDGE_TEST, FLOOR_TEST

    floor = any(s.test == FLOOR_TEST for s in result.summary)
    for test, final in result.final_stage.items():
        if test == LABEL_TEST:
            _print_label_summary(result, console)
            continue
        if test == ENTROPY_TEST:
            _print_entropy_summary(result, console)
            continue
        rows = {(s.method, s.metric): s for s in result.summary
                if s.test == test and s.stage_index == final}
        shows_floor = floor and any(not math.isnan(s.floor) for s in rows.values())
        console.print(_method_table(
            result, f"{test}: similarity to the trained model's maps at the final stage "
                    f"({final}), mean over images"
                    + ("; Δ: above the random-network floor" if shows_floor else ""),
            _floor_cell(rows)))
    for baseline, title in (
            (FLOOR_TEST, "random-network floor: two fully random copies of the model scored "
                         "against each other (a score near it means unrelated)"),
            (EDGE_TEST, "edge-detector similarity: the trained model's maps against the "
                        "input's Sobel edges")):
        scores = {(s.method, s.metric): s for s in result.summary if s.test == baseline}
        if scores:
            console.print(_method_table(result, f"{title}, mean over images",
                                        _mean_cell(scores)))
    if any(math.isnan(s.mean) for s in result.summary):
        console.print("n/a: undefined for every image, e.g. a constant (all-zero) map; "
                      "report.csv says why in its note column", highlight=False)
    console.print(f"outputs in {result.output_dir.resolve()} (report.csv, summary.csv, stages.csv, "
                  f"figures/, run.json); compute {result.timings.get('compute_s', 0):.1f} s",
                  highlight=False)


def _print_entropy_summary(result, console: Console) -> None:  # noqa: ANN001
    """eMPRT: each method's map entropy on the trained and the fully randomized model, and
    the relative rise (higher: the map reacts more to the randomization)."""
    from saliencycheck.config import ENTROPY_RISE
    from saliencycheck.runner.setup import ENTROPY_TEST
    from saliencycheck.verdicts import ENTROPY

    rows = {(s.method, s.stage_index, s.metric): s.mean for s in result.summary
            if s.test == ENTROPY_TEST}
    table = Table(title="entropy_mprt: histogram entropy of the maps (nats), mean over images",
                  title_justify="left")
    for column in ("method", "trained", "fully randomized", "relative rise"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method in result.methods:
        table.add_row(method, *[_fmt(rows.get(key, math.nan)) for key in (
            (method, 0, ENTROPY), (method, 1, ENTROPY), (method, 1, ENTROPY_RISE))])
    console.print(table)


def _print_label_summary(result, console: Console) -> None:  # noqa: ANN001
    """Similarity of the random-label model's maps to the trained model's, next to the
    control's (what retraining with true labels alone does), and whether the test is valid."""
    from saliencycheck.label_training import CONTROL, RANDOM_LABELS
    from saliencycheck.runner.setup import LABEL_TEST

    info = result.label_randomization
    rows = {(s.method, s.stage, s.metric): s for s in result.summary if s.test == LABEL_TEST}
    has_control = any(stage == CONTROL for _, stage, _ in rows)

    shows_floor = any(not math.isnan(s.above_floor) for (_, stage, _), s in rows.items()
                      if stage == RANDOM_LABELS)

    def cell(method: str, metric: str) -> str:
        random = rows.get((method, RANDOM_LABELS, metric))
        control = rows.get((method, CONTROL, metric))
        text = (_fmt(random.mean) if random else "-") + (
            f" ({_fmt(control.mean)})" if control else "")
        if random and not math.isnan(random.above_floor):
            text += f"\n[dim]Δ{_fmt(random.above_floor)}[/]"
        return text

    console.print(_method_table(
        result, "label_randomization: similarity to the trained model's maps, random-label "
                "model" + (" (true-label control)" if has_control else "")
                + ", mean over images" + ("; Δ: above the random-network floor"
                                          if shows_floor else ""), cell))
    if info is not None:
        status = ("[green]valid[/]" if info["valid"]
                  else "[bold yellow]INVALID[/] (not passed, not failed)")
        console.print(f"label randomization: {status}: {info['reason']}", highlight=False)


def _print_verdicts(result, console: Console) -> None:  # noqa: ANN001
    """The verdict table and the gate's outcome."""
    from saliencycheck.verdicts import interval_text

    colour = {"PASS": "green", "FAIL": "red", "INVALID": "yellow"}
    table = Table(title="verdicts (verdicts.csv)", title_justify="left")
    for column in ("method", "test", "verdict", "evidence: mean [CI]; the bound judged"):
        table.add_column(column)
    for v in result.verdicts:
        table.add_row(v.method, v.test, f"[{colour[v.verdict]}]{v.verdict}[/]",
                      f"{interval_text(v.statistic, v.ci_low, v.ci_high)}; {v.reason}")
    console.print(table)
    if result.failures:
        failed = ", ".join(f"{v.method} ({v.test})" for v in result.failures)
        console.print(f"[bold red]check failed[/] (fail_on): {failed}", highlight=False)
    else:
        console.print("[green]check passed[/]: no method named in fail_on failed",
                      highlight=False)


@app.command()
def merge(
    folders: Annotated[list[Path], typer.Argument(
        help="Output folders whose stored units to merge (shards of one run).",
        metavar="OUTPUT_DIR", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the merged units and report here (default: the first "
        "folder).")] = None,
    allow_partial: Annotated[bool, typer.Option(
        "--allow-partial", help="Write the report even when units are missing (run.json "
        "counts them).")] = False,
    junit: Annotated[Path | None, typer.Option(
        "--junit", help="Also write the verdicts as JUnit XML to this file (for CI).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the verdicts as JSON on stdout (tables go to stderr).")] = False,
) -> None:
    """Merge the units stored by shards into the report, summary, verdicts and figures.

    Exit code 2 naming the missing shards when units are missing; 1 as for run."""
    from saliencycheck.runner.merge import merge_outputs
    from saliencycheck.runner.store import check_writable

    with warnings.catch_warnings():
        warnings.simplefilter("once")
        warnings.showwarning = _show_warning
        _log_errors_in(output or folders[0])
        try:
            if output is not None:
                check_writable(output, "-o")
            with console.status("merging"):
                result = merge_outputs(folders, output=output, allow_partial=allow_partial)
        except SaliencyCheckError as exc:
            raise fail(exc) from None
        except OSError as exc:
            raise _output_failure(exc) from None
    if result.interrupted:
        err_console.print(f"[yellow]partial:[/] {result.units_done} of {result.units_total} "
                          "units merged", highlight=False)
    _show_result(result, junit=junit, as_json=as_json)


@app.command()
def validate(config: ConfigArg, overrides: SetOption = None) -> None:
    """Check a config without running: schema, model build and weights, layers, images."""
    from saliencycheck.runner import prepare
    from saliencycheck.runner.setup import unreadable_images

    try:
        loaded = load_config(config, overrides)
        setup = prepare(loaded, probe_methods=True)
    except SaliencyCheckError as exc:
        raise fail(exc) from None
    skipped = unreadable_images(setup)
    for image in skipped:
        err_console.print(f"[yellow]warning:[/] unreadable image {image.path}: {image.reason}",
                          highlight=False)
    stages = ", ".join(f"{t} {len(s)} stages" for t, s in setup.stages.items()) or "no tests"
    console.print(f"{config}: valid. {loaded.config.model.name} ({setup.weights_source}), "
                  f"{len(setup.images) - len(skipped)} images ({len(skipped)} unreadable), "
                  f"{len(setup.methods)} methods, {stages}.", highlight=False)


@app.command()
def compare(
    baseline: Annotated[Path, typer.Argument(help="Output folder of the baseline run.")],
    new: Annotated[Path, typer.Argument(help="Output folder of the new run.")],
    tolerance: Annotated[float, typer.Option(help="Largest rise of a mean similarity that is "
                                             "not a regression.")] = 0.05,
) -> None:
    """Compare two runs' summaries; exit 1 on any regression beyond the tolerance."""
    from saliencycheck.compare import compare_runs

    try:
        result = compare_runs(baseline, new, tolerance=tolerance)
    except SaliencyCheckError as exc:
        raise fail(exc) from None
    for title, changes, colour in (("regressions", result.regressions, "red"),
                                   ("improvements", result.improvements, "green")):
        if not changes:
            continue
        table = Table(title=f"{title} (mean scores; a rise is worse, a fall for input "
                            "invariance and entropy_rise)", title_justify="left")
        for column in ("method", "test", "stage", "metric", "baseline", "new", "change"):
            table.add_column(column)
        for c in changes:
            delta = "" if c.delta is None else f"[{colour}]{c.delta:+.3f}[/]"
            table.add_row(c.method, c.test, c.stage, c.metric, c.baseline, c.new, delta)
        console.print(table)
    verdict = (f"[bold red]{len(result.regressions)} regression(s)[/]" if result.regressions
               else "[green]no regression[/]")
    console.print(f"{verdict} beyond tolerance {tolerance} ({result.compared} scores compared, "
                  f"{len(result.improvements)} improved)", highlight=False)
    if result.regressions:
        raise typer.Exit(code=1)


@app.command()
def init(path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path(
             "saliencycheck.yaml"),
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False
         ) -> None:
    """Write a fully commented starter config."""
    from saliencycheck.starter import starter_config

    if path.exists() and not force:
        err_console.print(f"[bold red]error:[/] {path} exists; use --force to overwrite")
        raise typer.Exit(code=2)
    path.write_text(starter_config(), encoding="utf-8")
    console.print(f"wrote {path}; edit it, then `saliencycheck validate {path}`", highlight=False)


@app.command()
def methods() -> None:
    """List the attribution methods and their parameters."""
    from saliencycheck.methods import available_methods

    table = Table(title="attribution methods")
    table.add_column("name")
    table.add_column("description")
    table.add_column("parameters (default)")
    for spec in available_methods():
        params = "\n".join(
            f"{name} ({'required' if info.is_required() else info.default!r}): {info.description}"
            for name, info in spec.params.model_fields.items())
        table.add_row(spec.name, spec.description, params or "-")
    console.print(table)


def main() -> None:
    """Console-script entry point: an exception no command turned into a message is a bug
    (exit 3): one line here, the traceback in error.log, or on the terminal with --debug."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 (the last line of defence)
        if os.environ.get("SALIENCYCHECK_DEBUG") == "1":  # the traceback here, still exit 3
            traceback.print_exc()
            sys.exit(3)
        log = _write_error_log()
        first = first_line(exc)[:200]
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first)}; "
                          f"the traceback is in {log} (--debug shows it here); please report "
                          "it with that file", highlight=False, soft_wrap=True)
        sys.exit(3)


def _write_error_log() -> Path:
    """The current exception's traceback in the output folder's error.log (or, before one
    is known or when it is not writable, the temporary folder's saliencycheck-error.log)."""
    text = traceback.format_exc()
    for folder, name in ((_error_log_dir, "error.log"),
                         (Path(tempfile.gettempdir()), "saliencycheck-error.log")):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    return Path("(nowhere: no writable folder)")

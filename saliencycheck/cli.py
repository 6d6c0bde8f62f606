"""The `saliencycheck` command line: thin Typer wrappers over the runner.

The only module that prints or chooses exit codes: 0 success, 1 a configured check failed,
2 bad usage / config / input (one line, no traceback), 3 internal error (one line; the
traceback goes to error.log, or to the terminal with --debug), 130 interrupted (SIGINT), 143
terminated (SIGTERM).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from saliencycheck.atomic import atomic_write_text
from saliencycheck.config import load_config
from saliencycheck.errors import (
    RunInterrupted,
    SaliencyCheckError,
    Terminated,
    UsageError,
    UserCodeError,
    first_line,
)
from saliencycheck.runner.ownership import ERROR_LOG

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
_terminated = False  # a SIGTERM arrived
_signal_reported = False  # a command said what the interrupt left behind
# click's exception base: the usage errors (unknown option, missing argument, bad value). Newer
# typer releases vendor click, so it is taken from typer's own BadParameter, whichever it is.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
OUTPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]
OutputOption = Annotated[str | None, typer.Option(
    "--output", "-o", help="Output folder (overrides output.dir).", show_default=False)]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Write into a non-empty output folder saliencycheck did not create "
    "(it still deletes only files it writes).")]
JunitOption = Annotated[Path | None, typer.Option(
    "--junit", help="Also write the verdicts as JUnit XML to this file (for CI).")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print the verdicts as JSON on stdout (tables go to stderr).")]
SummaryOption = Annotated[Path | None, typer.Option(
    "--summary-md", help="Append a Markdown summary (outcome, verdicts, scores) to this file; "
    "by default to $GITHUB_STEP_SUMMARY when it is set (a GitHub Actions job summary).")]


@app.callback()
def options(ctx: typer.Context, debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of an internal error instead of writing it "
        "to error.log (also: SALIENCYCHECK_DEBUG=1).")] = False) -> None:
    """Sanity checks for saliency maps (Adebayo et al. 2018) from one YAML config."""
    if debug:
        os.environ["SALIENCYCHECK_DEBUG"] = "1"
    # SIGTERM (CI cancellation, a Slurm time limit) is handled like Ctrl-C: finished units
    # kept, the report written from them, exit 143. The previous handler is put back after.
    previous = signal.signal(signal.SIGTERM, _terminate)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def _terminate(signum: int, frame: object) -> None:
    global _terminated
    _terminated = True  # typer turns an interrupt it sees into exit 130: main() corrects it
    raise Terminated()


def fail(exc: SaliencyCheckError) -> typer.Exit:
    message = escape(str(exc))
    if exc.exit_code == 3:  # not the user's input: what the worker said goes to error.log
        message += f" (details in {_write_error_log()})"
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=exc.exit_code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@app.command()
def run(config: ConfigArg, overrides: SetOption = None, output: OutputOption = None,
        retrain: Annotated[bool, typer.Option(
            "--retrain", help="Train the label randomization models again instead of reusing "
            "the cached ones.")] = False,
        junit: JunitOption = None, as_json: JsonOption = False,
        summary_md: SummaryOption = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Keep the units already stored in the output folder and run only "
            "the rest; refused when they come from another config or other input files.")
        ] = False,
        shard: Annotated[str | None, typer.Option(
            "--shard", metavar="I/N", help="Run only shard I of N (0-based) into the shared "
            "output folder, without a report (then `saliencycheck merge`). Default in a Slurm "
            "array job: from SLURM_ARRAY_TASK_ID, _MIN, _STEP and _COUNT.",
            show_default=False)] = None,
        force: ForceOption = False,
        ) -> None:
    """Run the configured sanity checks and write reports and figures.

    Exit code 1 when a method named in fail_on fails a test with a threshold."""
    part = out = None
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        warnings.showwarning = _show_warning
        try:
            from saliencycheck.runner import prepare, run_check
            from saliencycheck.runner.lock import FolderLock
            from saliencycheck.runner.ownership import OutputFolder, check_apart
            from saliencycheck.runner.run import run_shard
            from saliencycheck.runner.shards import parse_shard, shard_from_env

            part = parse_shard(shard) if shard is not None else shard_from_env(os.environ)
            overrides = [*(overrides or []), *_output_override(output)]
            loaded = load_config(config, overrides)
            out = loaded.resolve(loaded.config.output.dir)
            field = f"{loaded.source.name}: output.dir"
            # folders and globs now (listed images once found), before the folder is made
            check_apart(out, loaded.resolve(loaded.config.images.path), [], field=field)
            folder = OutputFolder.claim(out, force=force, field=field)
            if junit is not None:  # once the folder is claimed: it may lie inside
                _check_output_file(junit, "--junit", out)
            with FolderLock(out, shared=part is not None):
                _log_errors_in(folder)
                with console.status("loading model and images"):
                    setup = prepare(loaded)
                labels = ", ".join(m.label for m in setup.methods)
                stages = "; ".join(f"{t}: {len(s)} stages" for t, s in setup.stages.items())
                err_console.print(
                    f"model {loaded.config.model.label} ({setup.weights_source}) on "
                    f"{setup.device}; {len(setup.images)} image files; methods {labels}; "
                    f"{stages}", highlight=False)
                with _progress() as bar:
                    task = bar.add_task("running", total=None)

                    def advance(steps: int, total: int, text: str) -> None:
                        bar.update(task, advance=steps, total=total, description=text)

                    if part is not None:
                        done = run_shard(setup, part, progress=advance, retrain=retrain,
                                         force=force)
                    else:
                        result = run_check(setup, progress=advance, retrain=retrain,
                                           resume=resume, force=force)
                if part is None:
                    _show_result(result, junit=junit, as_json=as_json, folder=folder,
                                 summary_md=summary_md)
        except SaliencyCheckError as exc:
            raise fail(exc) from None
        except OSError as exc:
            raise _output_failure(exc) from None
        except SystemExit as exc:
            raise fail(_user_exit(exc)) from None
        except RunInterrupted as stop:
            raise _stopped(stop.interrupt, f"{stop.units_done} of {stop.units_total} work units "
                           "are stored; the report written from them is partial (run.json: "
                           "complete false); --resume finishes the run") from None
        except KeyboardInterrupt as stop:
            raise _stopped(stop, _left_behind(out, shard=part is not None)) from None
    if part is not None:
        _print_shard(done)


def _output_override(output: str | None) -> list[str]:
    """``-o DIR`` as an output.dir override; an empty one (``-o "$UNSET"``) is refused: it
    would mean the current folder."""
    if output is None:
        return []
    if not output.strip():
        raise UsageError("-o: empty output folder (an unset shell variable?); give a folder, "
                         "e.g. -o runs/latest")
    return [f"output.dir={json.dumps(str(Path(output).resolve()))}"]  # quoted: ': ', '#'


def _check_output_file(path: Path, option: str, out: Path) -> None:
    """Before any compute: ``path`` can be written (its folder is created if missing), and
    is not one of saliencycheck's own files in the output folder ``out``."""
    from saliencycheck.runner.ownership import OutputFolder
    from saliencycheck.runner.run import is_reserved

    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file path, e.g. "
                         f"{option} {path / 'saliencycheck.xml'}")
    if out.resolve() in path.resolve().parents and is_reserved(
            path.resolve().relative_to(out.resolve())):
        raise UsageError(f"{option} {path}: saliencycheck writes that path (or its folder) "
                         f"itself in the output folder; give another file, e.g. "
                         f"{option} {out / 'junit.xml'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        OutputFolder.probe(path.parent)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc}); give "
                         "a writable path") from None


def _stopped(interrupt: BaseException, what: str) -> typer.Exit:
    """Say what a SIGINT or SIGTERM left behind in one line; exit 130 or 143."""
    global _signal_reported
    _signal_reported = True
    name = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
    err_console.print(f"[bold red]{name}:[/] {what}", highlight=False, soft_wrap=True)
    return typer.Exit(code=143 if isinstance(interrupt, Terminated) else 130)


def _left_behind(out: Path | None, *, shard: bool) -> str:
    """What an interrupt outside the units (loading, or while the report was written) left."""
    if shard:
        return "the finished work units are stored; run the shard again to finish it"
    if out is not None and (out / "units" / "plan.json").is_file():
        return (f"{out} holds no report (run.json absent); the finished work units are "
                "stored: --resume finishes the run and writes it")
    return "nothing was computed"


def _user_exit(exc: SystemExit) -> UserCodeError:
    """``sys.exit`` called by the user's code (a model's forward, a factory, a custom method):
    never an exit code that could pass for a verdict."""
    return UserCodeError(f"the model's or a custom method's code called sys.exit({exc.code!r}) "
                         "during the run; saliencycheck stopped without a report (exit 3, not "
                         "its code, so a CI gate cannot pass by it); remove that call")


def _log_errors_in(folder) -> None:  # noqa: ANN001 (an OutputFolder)
    """Write an internal error's traceback to the output folder's error.log, removing an
    earlier run's log (one saliencycheck wrote) so it never passes for this one's."""
    global _error_log_dir
    _error_log_dir = folder.root
    folder.remove([ERROR_LOG])


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


def _show_result(result, *, junit: Path | None, as_json: bool, folder,  # noqa: ANN001
                 summary_md: Path | None = None) -> None:
    """Print what a run or merge found, write the JUnit file and the job summary, exit 1 if
    the gate fails."""
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
    for test, info in result.validity.items():
        if not info["valid"]:
            err_console.print(f"[yellow]warning:[/] {test.replace('_', ' ')} is invalid: "
                              f"{escape(info['reason'])}; its scores say nothing (flagged in "
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

        atomic_write_text(junit, junit_xml(result.verdicts, result.failures))
        if folder.root.resolve() in junit.resolve().parents:
            folder.record([junit])
    step_summary = summary_md or (Path(os.environ["GITHUB_STEP_SUMMARY"])
                                  if os.environ.get("GITHUB_STEP_SUMMARY") else None)
    if step_summary is not None and result.output_dir is not None:
        from saliencycheck.report.markdown import append_job_summary

        append_job_summary(result.output_dir, step_summary)
    if as_json:
        from saliencycheck.verdicts import verdicts_json

        typer.echo(verdicts_json(result.verdicts, result.failures))
    if result.failures:
        raise typer.Exit(code=1)


def _progress() -> Progress | PlainProgress:
    """rich's bar on a terminal; plain lines where standard error is a log (CI), in which
    rich would show nothing until its last frame."""
    if not err_console.is_terminal:
        return PlainProgress(err_console)
    return Progress(TextColumn("{task.description}", table_column=None), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                    transient=False)


class PlainProgress:
    """Progress as plain log lines: one when a work unit finishes, at most one every
    ``interval`` seconds, and the last; each with the share done, the unit and image range
    being worked on, the time elapsed and an estimate of the time left."""

    def __init__(self, console: Console, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.interval, self.clock = console, interval, clock
        self.done, self.total, self.text = 0.0, None, ""
        self.unit: str | None = None  # the work unit of the last description
        self.units = 0

    def __enter__(self) -> PlainProgress:
        self.started = self.last = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.done:
            if self.unit is not None and self.total and self.done >= self.total:
                self.units += 1  # the last unit finished too
            self._line()

    def add_task(self, description: str, total: float | None = None) -> int:
        self.text, self.total = description, total
        return 0

    def update(self, task: int, *, advance: float = 0, total: float | None = None,
               description: str | None = None) -> None:
        self.done += advance
        self.total = total if total is not None else self.total
        if description is not None:
            unit = description.split(":")[0]
            if unit.startswith("unit-"):  # not the set-up before the units (label models)
                if self.unit is not None and unit != self.unit:
                    self.units += 1  # the previous unit finished
                self.unit = unit
            self.text = description
        if self.clock() - self.last >= self.interval:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        self.last = now
        elapsed = now - self.started
        share = self.done / self.total if self.total else 0.0
        left = f", about {_duration(elapsed / share - elapsed)} left" if 0 < share < 1 else ""
        total = f"{self.total:.0f}" if self.total else "?"
        self.console.print(f"progress: {share:.0%} ({self.done:.0f} of {total} "
                           f"steps), {self.units} work unit(s) done, now {self.text}; elapsed "
                           f"{_duration(elapsed)}{left}", highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _print_summary(result, console: Console) -> None:  # noqa: ANN001
    """Each check's table (its own: ``Check.table``), then where the outputs are."""
    from saliencycheck.checks import CHECKS
    from saliencycheck.checks.base import View

    for check in CHECKS:
        table = check.table(View(summary=result.summary, methods=result.methods,
                                 metrics=result.metrics,
                                 final=result.final_stage.get(check.name),
                                 validity=result.validity.get(check.name)))
        if table is not None:
            console.print(table, highlight=False)
    if any(math.isnan(s.mean) for s in result.summary):
        console.print("n/a: undefined for every image, e.g. a constant (all-zero) map; "
                      "report.csv says why in its note column", highlight=False)
    console.print(f"outputs in {result.output_dir.resolve()} (report.csv, summary.csv, stages.csv, "
                  f"figures/, run.json); compute {result.timings.get('compute_s', 0):.1f} s",
                  highlight=False)


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
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Write the merged units and report here (default: the first "
        "folder).", show_default=False)] = None,
    allow_partial: Annotated[bool, typer.Option(
        "--allow-partial", help="Write the report even when units are missing (run.json "
        "counts them).")] = False,
    junit: JunitOption = None, as_json: JsonOption = False, force: ForceOption = False,
    summary_md: SummaryOption = None,
) -> None:
    """Merge the units stored by shards into the report, summary, verdicts and figures.

    Exit code 2 naming the missing shards when units are missing; 1 as for run."""
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        warnings.showwarning = _show_warning
        try:
            from saliencycheck.runner.lock import FolderLock
            from saliencycheck.runner.merge import check_mergeable, merge_outputs
            from saliencycheck.runner.ownership import OutputFolder

            if output is not None and not output.strip():
                raise UsageError("-o: empty output folder (an unset shell variable?); give a "
                                 "folder, or leave -o out to merge into the first folder")
            target = Path(output) if output is not None else folders[0]
            check_mergeable(folders)
            folder = OutputFolder.claim(target, force=force,
                                        field="-o" if output is not None else str(target))
            if junit is not None:
                _check_output_file(junit, "--junit", target)
            with FolderLock(target):
                _log_errors_in(folder)
                with console.status("merging"):
                    result = merge_outputs(folders, output=target if output is not None
                                           else None, allow_partial=allow_partial, force=force)
                if result.interrupted:
                    err_console.print(f"[yellow]partial:[/] {result.units_done} of "
                                      f"{result.units_total} units merged", highlight=False)
                _show_result(result, junit=junit, as_json=as_json, folder=folder,
                             summary_md=summary_md)
        except SaliencyCheckError as exc:
            raise fail(exc) from None
        except OSError as exc:
            raise _output_failure(exc) from None
        except SystemExit as exc:
            raise fail(_user_exit(exc)) from None
        except KeyboardInterrupt as stop:
            raise _stopped(stop, "the merge stopped before its report was complete (run.json "
                           "absent); the stored units are kept: run the merge again") from None


@app.command()
def validate(config: ConfigArg, overrides: SetOption = None) -> None:
    """Check a config without running: schema, model build and weights, layers, images."""
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        warnings.showwarning = _show_warning
        from saliencycheck.runner import prepare
        from saliencycheck.runner.setup import (
            check_label_checkpoints,
            input_path_activations,
            method_statuses,
            unreadable_images,
        )

        try:
            loaded = load_config(config, overrides)
            setup = prepare(loaded)
            statuses = method_statuses(setup)
            refused = [s for s in statuses if s.error is not None]
            if refused:
                more = (f" (and {len(refused) - 1} more refused: "
                        f"{', '.join(s.label for s in refused[1:])})" if len(refused) > 1 else "")
                error = refused[0].error
                raise type(error)(f"{loaded.source.name}: {error}{more}")
            try:
                check_label_checkpoints(setup)
            except SaliencyCheckError as exc:  # as prepare names its errors: the file first
                raise type(exc)(f"{loaded.source.name}: {exc}") from None
            activations = input_path_activations(setup)
        except SaliencyCheckError as exc:
            raise fail(exc) from None
        except SystemExit as exc:
            raise fail(_user_exit(exc)) from None
        skipped = unreadable_images(setup)
        for image in skipped:
            err_console.print(f"[yellow]warning:[/] unreadable image {image.path}: {image.reason}",
                              highlight=False)
        stages = ", ".join(f"{c.name} {len(setup.stages[c.name])} stages"
                           if c.name in setup.stages else c.name
                           for c in setup.checks if not c.baseline) or "no tests"
        console.print(f"{config}: valid. {loaded.config.model.label} ({setup.weights_source}), "
                      f"{len(setup.images) - len(skipped)} images ({len(skipped)} unreadable), "
                      f"{len(setup.methods)} methods, {stages}.", highlight=False)
        console.print(_compatibility_table(setup, statuses, activations), highlight=False)
        if setup.stages:
            from saliencycheck.randomization import BLOCK_RULE, LAYER_RULE

            console.print(f"Blocks. {BLOCK_RULE}. {LAYER_RULE}.", highlight=False)
        for test, test_stages in setup.stages.items():
            console.print(_stage_table(test, test_stages, setup.config), highlight=False)


def _compatibility_table(setup, statuses: list, activations) -> Table:  # noqa: ANN001
    """Each method's status on this model (probed on the first image), Grad-CAM's layer and
    layout, and the activations on the input's path the guided rule would meet."""
    on_path = f"{activations.relu_calls} ReLU call(s) on the input's path"
    off = (f", {activations.off_path_relus} that do not see the input"
           if activations.off_path_relus else "")
    others = ", ".join(f"{a}×{n}" for a, n in sorted(activations.other_activations.items()))
    table = Table(title=f"methods on this model ({on_path}{off}"
                        + (f"; other activations: {others}" if others else "") + ")",
                  title_justify="left")
    for column in ("method", "status", "detail"):
        table.add_column(column, overflow="fold")
    colour = {"ok": "green", "warning": "yellow", "refused": "red"}
    for method, status in zip(setup.methods, statuses):
        detail = status.detail
        if "layer" in type(method.params).model_fields:
            layout = getattr(method.params, "layout", "nchw")
            detail = "; ".join(d for d in (f"layer {method.params.layer} ({layout})", detail)
                               if d)
        table.add_row(method.label, f"[{colour[status.status]}]{status.status}[/]",
                      escape(detail))
    return table


def _stage_table(test: str, stages: list, config) -> Table:  # noqa: ANN001 (a Config)
    """A randomization test's stages: the block each randomizes, its size, the share of the
    model randomized."""
    section = getattr(config.tests, test)
    granularity = getattr(section, "granularity", config.tests.cascading.granularity)
    table = Table(title=f"{test}: {len(stages)} stages, {granularity} granularity"
                  + (f", blocks {section.blocks}" if getattr(section, "blocks", None) else ""),
                  title_justify="left")
    for column in ("stage", "block randomized", "parameters", "share of the model"):
        table.add_column(column, justify="left" if column == "block randomized" else "right")
    for stage in stages:
        new = next((b for b in stage.randomized_blocks if b.name == stage.name), None)
        table.add_row(str(stage.index), stage.name, f"{new.numel:,}" if new else "",
                      f"{stage.fraction_randomized:.1%}")
    return table


@app.command()
def compare(
    baseline: Annotated[Path, typer.Argument(help="Output folder of the baseline run.")],
    new: Annotated[Path, typer.Argument(help="Output folder of the new run.")],
    tolerance: Annotated[float, typer.Option(help="Largest rise of a mean similarity that is "
                                             "not a regression.")] = 0.05,
    html: Annotated[Path | None, typer.Option(
        "--html", help="Also write the comparison as one self-contained page (what moved, "
        "verdict changes, both runs' curves side by side).")] = None,
) -> None:
    """Compare two runs' summaries; exit 1 on any regression beyond the tolerance."""
    from saliencycheck.compare import compare_runs

    try:
        result = compare_runs(baseline, new, tolerance=tolerance)
        if html is not None:
            from saliencycheck.report.html import render_diff

            if html.is_dir() or not html.parent.is_dir():
                raise UsageError(f"--html {html}: give a file in an existing folder, e.g. "
                                 "--html diff.html")
            atomic_write_text(html, render_diff(baseline, new, result, tolerance))
    except SaliencyCheckError as exc:
        raise fail(exc) from None
    except OSError as exc:
        raise fail(UsageError(f"--html {html}: cannot write it ({exc.strerror or exc})")) \
            from None
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
def report(
    output_dir: Annotated[Path, typer.Argument(help="Output folder of a finished run.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where to write the "
                                                "page (default OUTPUT_DIR/report.html).")] = None,
) -> None:
    """Write report.html for a stored run, from its files alone (nothing is recomputed)."""
    from saliencycheck.report.html import REPORT_HTML, write_html_report
    from saliencycheck.runner.lock import FolderLock
    from saliencycheck.runner.ownership import MANIFEST, STATE_DIR, OutputFolder

    try:
        if output is not None and not output.parent.is_dir():
            raise UsageError(f"folder {output.parent} does not exist; create it first or give "
                             "another --output")
        target = (output or output_dir / REPORT_HTML).resolve()
        if target.parent != output_dir.resolve():
            path = write_html_report(output_dir, output)
        elif (output_dir / STATE_DIR / MANIFEST).is_file():
            # the run's own folder: written as saliencycheck's file (never over the user's),
            # so a later run there deletes or replaces it as its own
            with FolderLock(output_dir):
                folder = OutputFolder(output_dir)
                folder.check_free([target.name])
                path = write_html_report(output_dir, target)
                folder.record([path])
        elif target.exists():
            raise UsageError(f"{target} exists and was not written by saliencycheck (the "
                             "folder has no manifest); give another path with -o")
        else:
            path = write_html_report(output_dir, target)
    except OSError as exc:
        raise fail(UsageError(f"cannot write {output or output_dir} ({exc.strerror or exc}); "
                              "give a path in a writable folder with --output")) from None
    except SaliencyCheckError as exc:
        raise fail(exc) from None
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", highlight=False)


@app.command()
def init(path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path(
             "saliencycheck.yaml"),
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False
         ) -> None:
    """Write a fully commented starter config."""
    from saliencycheck.starter import starter_config

    try:
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name, e.g. "
                             f"{path / 'saliencycheck.yaml'}")
        if path.exists() and not force:
            raise UsageError(f"{path} exists; use --force to overwrite")
        if not path.parent.is_dir():
            raise UsageError(f"folder {path.parent} does not exist; create it first "
                             f"(mkdir -p {path.parent}) or give another path")
        atomic_write_text(path, starter_config())
    except OSError as exc:
        raise fail(UsageError(f"cannot write {path} ({exc.strerror or exc}); give a path in "
                              "a writable folder")) from None
    except SaliencyCheckError as exc:
        raise fail(exc) from None
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
    """Console-script entry point: click's usage errors as one ``error:`` line (exit 2); an
    interrupt no command reported as one line (exit 130, or 143 for SIGTERM); an exception
    no command turned into a message is a bug (exit 3): one line here, the traceback in
    error.log, or on the terminal with --debug."""
    global _terminated, _signal_reported
    _terminated = _signal_reported = False
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)  # returns a command's exit code (None: 0)
    except CLICK_ERROR as exc:  # an unknown option, a missing argument, a bad value
        context = getattr(exc, "ctx", None)
        hint = f" (see {context.command_path} --help)" if context is not None else ""
        if type(exc).__name__ != "NoArgsIsHelpError":  # (that one printed the help)
            err_console.print(f"[bold red]error:[/] {escape(exc.format_message() + hint)}",
                              highlight=False, soft_wrap=True)
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort) as stop:
        _terminated = _terminated or isinstance(stop, Terminated)
        code = 130
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
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == 130 and not _signal_reported:  # before a command could say what it left
        code = _stopped(Terminated() if _terminated else KeyboardInterrupt(),
                        "stopped before any work; nothing was written").exit_code
    sys.exit(code or 0)


def _write_error_log() -> Path:
    """The current exception's traceback in the output folder's error.log (recorded there as
    saliencycheck's own), or, before one is known, when it is not writable or when an
    error.log there is not saliencycheck's, the temporary folder's saliencycheck-error.log."""
    from saliencycheck.runner.ownership import OutputFolder

    text = traceback.format_exc()
    if _error_log_dir is not None:
        folder = OutputFolder(_error_log_dir)
        path = _error_log_dir / ERROR_LOG
        try:
            if not path.exists() or folder.is_ours(ERROR_LOG):
                atomic_write_text(path, text)
                folder.record([path])
                return path
        except (OSError, SaliencyCheckError):  # unwritable, or a damaged manifest
            pass
    path = Path(tempfile.gettempdir()) / "saliencycheck-error.log"
    try:
        path.write_text(text, encoding="utf-8")
        return path
    except OSError:
        return Path("(nowhere: no writable folder)")

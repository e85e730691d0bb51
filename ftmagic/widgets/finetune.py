"""``%%finetune`` and ``%%ft_generate``: train from a YAML cell, then try the result.

Flags are generated from the config's fields (``lora_r`` -> ``--lora-r``), so the cell
body, the flags, the CLI and Python keyword arguments are four spellings of the same
settings; flags win over the body. Nothing heavy is imported here: ipywidgets loads
when a widget is shown and torch when the engine starts.

Example (in a notebook)::

    %load_ext ftmagic

    %%finetune --max-steps 50 --name ft
    model: tiny
    data: $train_records      # a notebook variable: list of dicts, DataFrame, datasets.Dataset
    lora_r: 8

    %%ft_generate --base
    reverse: hello
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import threading
import typing
from contextlib import contextmanager
from typing import Any, Callable, Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ftmagic.config import FinetuneConfig, Problems, config_fields, flag_name, load_yaml, parse_yaml_mapping
from ftmagic.errors import ConfigError, a_type
from ftmagic.usage import as_usage_error, expand_vars, magic_argv, parse_magic_args

CELL_SOURCE = "%%finetune cell"
PROGRESS_MODES = ("auto", "widget", "text", "none")
# Keys whose value may name a notebook variable (`data: $train_df`): their flags' metavar and help.
_DATA_KEYS = {"data": ("PATH|$VAR", "file, folder, dataset id or $variable"),
              "eval_data": ("PATH|$VAR", "file, folder, dataset id or $variable"),
              "eval_prompts": ("N|PATH|$VAR", "records to hold out, or a file, folder, dataset id or $variable"),
              "eval_metrics": ("A,B|$VAR", "metric names, comma-separated, or a $function")}
# Keys whose value is a YAML mapping: an example of each, for its help and its error.
_MAPPING_EXAMPLES = {"columns": "{prompt: question}", "sweep": "{lr: [1.0e-4, 3.0e-4]}"}
_FIELD_TYPES = typing.get_type_hints(FinetuneConfig)


# --------------------------------------------------------------------------- flags from the config


def _flag_spec(field) -> tuple[dict, str]:
    """argparse keywords for one config field, and its help text (type and default)."""
    annotation = _FIELD_TYPES[field.name]
    origin = typing.get_origin(annotation)
    default = None if field.default is dataclasses.MISSING else field.default
    kwargs: dict = {"dest": field.name, "default": None}
    if annotation is bool:
        # `--packing` alone means true; `--packing false` is accepted too.
        kwargs.update(nargs="?", const="true", metavar="BOOL")
        kind = "true|false"
    elif origin is typing.Literal:
        choices = typing.get_args(annotation)
        kwargs["metavar"] = "{" + ",".join(choices) + "}"
        kind = "one of " + ", ".join(choices)
    elif field.name in _DATA_KEYS:
        kwargs["metavar"], kind = _DATA_KEYS[field.name]
    elif annotation is int:
        kwargs["metavar"] = "N"
        kind = "integer"
    elif annotation is float:
        kwargs["metavar"] = "X"
        kind = "number"
    elif typing.get_origin(annotation) is typing.Union and set(typing.get_args(annotation)) == {int, str}:
        kwargs["metavar"] = "auto|N"
        kind = "auto or a whole number"
    elif typing.get_origin(annotation) is typing.Union and list in typing.get_args(annotation):
        kwargs["metavar"] = "A,B"
        kind = "name or comma-separated list"
    elif annotation is dict or typing.get_origin(annotation) is typing.Union and dict in typing.get_args(annotation):
        kwargs["metavar"] = "YAML"
        kind = f"YAML mapping, e.g. '{_MAPPING_EXAMPLES.get(field.name, '{key: value}')}'"
    else:
        kwargs["metavar"] = "TEXT"
        kind = "text"
    default_text = "" if default is None else f"; default {default!r}"
    return kwargs, f"config key `{field.name}` ({kind}{default_text})"


def _with_config_flags(func: Callable) -> Callable:
    """Add one ``--flag`` per config field (decorators apply bottom-up, hence reversed)."""
    for field in reversed(config_fields()):
        kwargs, help_text = _flag_spec(field)
        func = argument(flag_name(field.name), help=help_text, **kwargs)(func)
    return func


def flag_overrides(args) -> dict:
    """The config values given as flags (strings; the config coerces and validates them).

    Comma lists become lists for list-valued keys and YAML mappings become dicts.
    """
    overrides = {}
    for field in config_fields():
        value = getattr(args, field.name, None)
        if value is None:
            continue
        annotation = _FIELD_TYPES[field.name]
        args_of = typing.get_args(annotation)
        if list in args_of and isinstance(value, str) and "," in value and field.name != "target_modules":
            # (target_modules: the config reads a comma list or one name itself, as from every front.)
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif (annotation is dict or dict in args_of) and isinstance(value, str):
            try:
                value = load_yaml(value, source=flag_name(field.name))
            except ConfigError as exc:
                if "invalid YAML" not in str(exc):
                    raise UsageError(str(exc)) from None
                example = _MAPPING_EXAMPLES.get(field.name, "{key: value}")
                raise UsageError(f"{flag_name(field.name)}: {value!r} is not a YAML mapping; "
                                 f"write e.g. '{example}'") from None
        overrides[field.name] = value
    return overrides


def _split_line(line: str) -> list[str]:
    """Split the magic's line like a shell and expand ``{var}`` / ``$var`` everywhere except
    in ``--data`` / ``--eval-data``, whose ``$name`` names the variable itself, not its text."""
    argv = magic_argv(line)
    data_flags = {flag_name(k) for k in _DATA_KEYS}
    out, keep_next = [], False
    for token in argv:
        literal = keep_next or token.split("=", 1)[0] in data_flags
        keep_next = token in data_flags
        out.append(token if literal else expand_vars(token))
    return out


def parse_line(magic_func: Callable, line: str):
    """Parse a magic's line with its ``magic_arguments`` parser (one-line errors: :func:`parse_magic_args`)."""
    cells = getattr(type(getattr(magic_func, "__self__", None)), "magics", {}).get("cell", {})
    return parse_magic_args(magic_func.parser, _split_line(line), prefix="%%" if magic_func.__name__ in cells else "%")


# --------------------------------------------------------------------------- config from a cell


def resolve_variables(value: Any, namespace: dict, where: str, key: str) -> Any:
    """Replace ``$name`` strings (also inside lists and mappings) with notebook variables.

    Raises ConfigError when a name is not a variable of the notebook.

    Example::

        resolve_variables("$train", {"train": [{"text": "hi"}]}, "cell:2: ", "data")
        # -> [{"text": "hi"}]
    """
    if isinstance(value, str) and value.startswith("$"):
        name = value[1:].strip()
        if not name.isidentifier():
            raise ConfigError(f"{where}`{key}: {value}`: after `$` write a variable name, e.g. `{key}: $train_df`")
        if name not in namespace:
            raise ConfigError(f"{where}`{key}: ${name}`: there is no variable `{name}` in the notebook; "
                              f"run the cell that defines it, or give a file path")
        return namespace[name]
    if isinstance(value, list):
        return [resolve_variables(item, namespace, where, key) for item in value]
    if isinstance(value, dict):
        return {k: resolve_variables(v, namespace, where, key) for k, v in value.items()}
    return value


def build_config(cell: str, overrides: Optional[dict] = None, namespace: Optional[dict] = None,
                 source: str = CELL_SOURCE, first_line: int = 2) -> FinetuneConfig:
    """The run's config: the YAML body, ``$variables`` resolved, flags (``overrides``) on top.

    Lines are counted as the user sees them: the magic line is line 1, so the body
    starts at ``first_line`` 2. Every mistake is reported at once, one line each, in one
    ConfigError; a value given as a flag is blamed on the flag (``--lr: ...``).

    Example::

        cfg = build_config("model: tiny\\ndata: $rows\\n", {"lora_r": "8"}, {"rows": records})
    """
    namespace = namespace if namespace is not None else {}
    values, lines = parse_yaml_mapping(cell or "", source, first_line=first_line)
    overrides = dict(overrides or {})
    problems = Problems(source, lines, {key: flag_name(key) for key in overrides})
    for key in _DATA_KEYS:
        for mapping in (values, overrides):
            if key in mapping:
                try:
                    mapping[key] = resolve_variables(mapping[key], namespace, "", key)
                except ConfigError as exc:
                    problems.add(key, str(exc))  # reported with the config's own problems
                    mapping[key] = None
    return FinetuneConfig.from_dict(values, source=source, lines=lines, override_label=flag_name,
                                    problems=problems, **overrides)


# --------------------------------------------------------------------------- where we run


def in_notebook(shell: Any = None) -> bool:
    """True inside a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab), where widgets render.

    Terminal IPython and plain ``InteractiveShell`` get text progress instead.
    """
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
    except ImportError:  # pragma: no cover - ipykernel present in sys.modules but broken
        return False
    return isinstance(shell, ZMQInteractiveShell)


def choose_progress(mode: str, shell: Any = None) -> str:
    """``auto`` -> ``widget`` in a notebook kernel, else ``text``; other modes are kept."""
    if mode == "auto":
        return "widget" if in_notebook(shell) else "text"
    return mode


class CellReporter:
    """Routes engine events to a widget, a text printer or nowhere, and ends the display.

    Each fact is shown once: in widget mode the widget's header carries the plan line and
    the trainable parameters, and the static summary that replaces it at the end carries
    them too (with the result's name), so nothing is printed beside it.

    Example::

        reporter = CellReporter("text")
        result = finetune(config, on_event=reporter, stop=reporter.stop)
        reporter.finish(result, name="ft")
    """

    def __init__(self, mode: str, stop: Optional[threading.Event] = None,
                 on_event: Optional[Callable[[dict], Any]] = None) -> None:
        from ftmagic.textprogress import RunState, TextProgress

        self.mode = mode
        self.stop = stop if stop is not None else threading.Event()
        self.extra = on_event  # an extra listener (tests click Stop from here)
        self.text = TextProgress() if mode == "text" else None
        self.widget = None
        self._state = RunState() if mode not in ("text", "widget") else None

    @property
    def state(self):
        if self.text is not None:
            return self.text.state
        if self.widget is not None:
            return self.widget.state
        return self._state

    def __call__(self, event: dict) -> None:
        if self.mode == "text":
            self.text(event)
        elif self.mode == "widget":
            if self.widget is None:
                self._open_widget()
            self.widget(event)
        else:
            self._state.update(event)
        if self.extra is not None:
            self.extra(event)

    def _open_widget(self) -> None:
        from ftmagic.widgets.progress import TrainingProgress

        self.widget = TrainingProgress(stop=self.stop)
        self.widget.show()

    def finish(self, result: Any, name: str) -> None:
        """Show the static summary (widget) or the closing lines (text)."""
        metrics = dict(getattr(result, "metrics", {}) or {})
        output_dir = getattr(result, "output_dir", None)
        if self.mode == "widget" and self.widget is not None:
            # The summary names the result and, after a stop, how to resume.
            self.widget.finish(metrics, output_dir=str(output_dir) if output_dir else None, name=name)
            return
        if self.mode == "text":
            self.text.close()
        if self.mode != "none":
            line = f"result bound to `{name}`"
            if metrics.get("stopped"):
                line += "; to continue, run the cell again with `--resume`"
            print(line)

    def abort(self) -> None:
        """The run raised: freeze the live display (a summary of what happened, or nothing)."""
        if self.mode == "widget" and self.widget is not None:
            if self.state.last_step is not None:
                self.widget.finish()
            else:
                if self.widget.handle is not None:
                    # Keep what was planned (model, device, data) above the error.
                    self.widget.handle.update(self.widget.header_bundle(), raw=True)
                self.widget.close()
        elif self.mode == "text":
            self.text.close()


def _engine_finetune() -> Callable:
    """The engine's entry point, imported when a run starts (torch loads here, not at %load_ext)."""
    from ftmagic.engine.run import finetune

    return finetune


# --------------------------------------------------------------------------- magics


@magics_class
class FinetuneMagics(Magics):
    """``%%finetune`` (train from a YAML cell) and ``%%ft_generate`` (try the result)."""

    @magic_arguments()
    @argument("--name", default="ft", help="variable that receives the RunResult (default `ft`)")
    @argument("--progress", default="auto", choices=PROGRESS_MODES,
              help="`auto`: a live widget in a notebook, a text bar in a terminal; or force `widget`, `text`, `none`")
    @_with_config_flags
    @no_var_expand
    @line_cell_magic
    def finetune(self, line: str, cell: Optional[str] = None) -> None:
        """Fine-tune a model; the cell body is the run's YAML config, flags override it.

        `%finetune --data train.jsonl --max-steps 50` (one `%`) runs with flags only.

        Use `data: $variable` (or `--data $variable`) to train on a notebook variable: a
        list of dicts, a pandas DataFrame or a datasets.Dataset. The result (a RunResult
        with .metrics, .history, .output_dir, .generate(prompt), .compare(prompts)) is
        bound to `--name` (default `ft`). Stop ends training after the current step and
        saves a checkpoint, as does the kernel's interrupt; `--resume` continues from the
        newest checkpoint in `output_dir`.

        A `sweep:` block (or `--sweep '{lr: [1.0e-4, 3.0e-4]}'`) runs a hyperparameter search
        instead: one run per trial, a live table of trials, the best run bound to `--name` and
        the whole search to `<name>_sweep`.

        Example::

            %%finetune --max-steps 100 --lora-r 8
            model: tiny
            data: $train_records
            val_split: 0.1
        """
        args = parse_line(self.finetune, line)
        name = args.name
        if not name.isidentifier():
            raise UsageError(f"--name {name!r} must be a Python variable name, e.g. `--name ft`")
        with as_usage_error():
            config = build_config(cell, flag_overrides(args), self.shell.user_ns)
        if config.sweep is not None:
            # The best cell keeps the cell as written: `$variables` as typed, flags as their typed values.
            flags = {key: value if key in _DATA_KEYS else getattr(config, key)
                     for key, value in flag_overrides(args).items()}
            values = {**parse_yaml_mapping(cell or "", CELL_SOURCE)[0], **flags}
            run_sweep_cell(config, values, name, choose_progress(args.progress, self.shell), self.shell.user_ns)
            return
        reporter = CellReporter(choose_progress(args.progress, self.shell))
        result = run_with_reporter(config, reporter)
        self.shell.user_ns[name] = result
        reporter.finish(result, name)

    @magic_arguments()
    @argument("--name", default="ft", help="variable holding the RunResult (default `ft`)")
    @argument("--run", metavar="OUTPUT_DIR", default=None,
              help="a finished run's output_dir instead of a variable (e.g. after a kernel restart)")
    @argument("--base", action="store_true", help="also answer with the base model, side by side")
    @argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer (default 64)")
    @cell_magic
    def ft_generate(self, line: str, cell: str) -> None:
        """Answer prompts with the fine-tuned model; `--base` adds the base model's answers.

        The cell body is one prompt per line, or prompts separated by `---` lines when a
        prompt spans several lines. The answers show as a table that stays in the saved
        notebook.

        Example::

            %%ft_generate --base
            reverse: hello
            reverse: world
        """
        from IPython.display import display

        from ftmagic.widgets.generate import compare_table_html, compare_table_text, split_prompts

        args = parse_line(self.ft_generate, line)
        prompts = split_prompts(cell)
        if not prompts:
            raise UsageError("%%ft_generate: write a prompt in the cell body (one per line)")
        result = run_result(self.shell.user_ns, args.name, args.run)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
        with as_usage_error():
            if args.base:
                rows = result.compare(prompts, max_new_tokens=args.max_new_tokens)
            else:
                rows = [{"prompt": p, "tuned": result.generate(p, max_new_tokens=args.max_new_tokens)}
                        for p in prompts]
        display({"text/html": compare_table_html(rows), "text/plain": compare_table_text(rows)}, raw=True)


def run_result(namespace: dict, name: str, run: Optional[str] = None):
    """The RunResult a magic works on: the run folder ``run`` (``--run``), else the notebook's ``name``.

    Example::

        result = run_result(shell.user_ns, "ft")            # the result of a %%finetune cell
        result = run_result(shell.user_ns, "ft", "runs/a")  # a saved run, reloaded
    """
    if run is not None:
        from ftmagic.engine.result import RunResult

        with as_usage_error():
            return RunResult.load(run)
    result = namespace.get(name)
    if result is None:
        raise UsageError(f"there is no `{name}` in the notebook: run a %%finetune cell first, pass "
                         "`--name` of the variable that holds its result, or `--run OUTPUT_DIR`")
    if not hasattr(result, "generate"):
        raise UsageError(f"`{name}` is {a_type(result)}, not a RunResult from %%finetune")
    return result


def run_sweep_cell(config: FinetuneConfig, values: dict, name: str, mode: str, namespace: dict):
    """A ``%%finetune`` cell with a ``sweep:`` block: run the search with a live table of trials,
    then bind the best run to ``name`` and the whole sweep to ``<name>_sweep``.

    ``values`` is the cell as written (``$variables`` unresolved), the base of the best trial's
    ready cell.
    """
    from ftmagic.engine.sweep import sweep
    from ftmagic.sweep_spec import parse_sweep

    stop = threading.Event()
    progress = printer = None
    if mode == "widget":
        from ftmagic.widgets.sweep import SweepProgress

        progress = SweepProgress(stop)
        progress.show()
    elif mode == "text":
        from ftmagic.textprogress import TextProgress

        printer = TextProgress()
    try:
        with as_usage_error(), quiet_library_progress_bars(mode != "none"):
            result = sweep(config, on_event=progress or printer, stop=stop)
    except BaseException:
        if progress is not None:
            progress.finish()
        raise
    spec = parse_sweep(config.sweep, config)
    cell = result.best_cell(values, name=name) if result.best_number is not None else None
    if progress is not None:
        progress.finish(cell, name, [s.key for s in spec.spaces if s.kind == "log_uniform"], trials=result.trials,
                        keys=spec.keys)
    elif printer is not None:
        from ftmagic.widgets.sweep import trials_table_text

        printer.close()
        print(trials_table_text(result.trials, spec.keys, spec.metric))
        if cell:
            print("best configuration, ready to run as a cell:\n" + cell)
    namespace[f"{name}_sweep"] = result
    if result.best_number is None:
        print(f"no trial completed; every trial is in `{name}_sweep` (see `{name}_sweep.trials`)")
        return result
    namespace[name] = result.best
    if mode != "none":
        print(f"best run (trial {result.best_number}) bound to `{name}`; every trial in `{name}_sweep`")
    return result


def run_with_reporter(config: FinetuneConfig, reporter: CellReporter):
    """Call the engine with the reporter's callback and stop event.

    User mistakes found by the engine (DataError, ModelError, MemoryFitError, ...) become
    one-line UsageErrors; anything else keeps its traceback. On any failure the live
    display is frozen so no dead Stop button is left behind.
    """
    finetune = _engine_finetune()
    try:
        with as_usage_error(), quiet_library_progress_bars(reporter.mode != "none"):
            return finetune(config, on_event=reporter, stop=reporter.stop)
    except BaseException:
        reporter.abort()
        raise


@contextmanager
def quiet_library_progress_bars(active: bool = True):
    """Silence transformers' and datasets' own progress bars during a run, then restore them.

    In a notebook each of them is a widget of its own ("Loading weights: 0%") that stays
    behind, dead, in the saved notebook; the run's progress is already on screen.
    """
    if not active:
        yield
        return
    restore = []
    for module_name in ("transformers.utils.logging", "datasets.utils.logging"):
        if module_name.split(".")[0] not in sys.modules and module_name.startswith("datasets"):
            continue  # not worth importing datasets for this; the run imports it if it needs it
        try:
            module = importlib.import_module(module_name)
            if module.is_progress_bar_enabled():
                module.disable_progress_bar()
                restore.append(module.enable_progress_bar)
        except (ImportError, AttributeError):
            continue
    try:
        yield
    finally:
        for enable in restore:
            enable()

"""The one configuration object of a run.

A YAML cell body, magic flags, CLI ``--set`` pairs and Python keyword arguments are four
spellings of the same fields: ``--lora-r 16`` == ``lora_r: 16`` == ``lora_r=16``. All
validation lives in :meth:`FinetuneConfig.validate`, so every front gets the same
one-line :class:`~ftmagic.errors.ConfigError`.

Example::

    >>> from ftmagic.config import FinetuneConfig
    >>> cfg = FinetuneConfig.from_yaml("model: tiny\\nmethod: lora\\nlora_r: 8\\n")
    >>> cfg.lora_r, cfg.method
    (8, 'lora')
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ftmagic.constants import DATA_SOURCE_KEYS, DEVICES, OPTIMIZERS, PRECISIONS
from ftmagic.errors import ConfigError
from ftmagic.methods import METHOD_NAMES, get_method_spec

# `report_to` trackers (ftmagic/engine/reporting.py has how each is written).
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text")

# The accepted values of the choice keys, built from their one home (the method table, the
# constants): `typing.Literal` of a tuple lists the tuple's items.
MethodName = Literal[METHOD_NAMES]
FormatName = Literal[FORMATS]
OptimizerName = Literal[OPTIMIZERS]
PrecisionName = Literal[PRECISIONS]
DeviceName = Literal[DEVICES]


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, with defaults that suit one Colab-class GPU.

    Example::

        cfg = FinetuneConfig(model="tiny", data="train.jsonl", method="qlora", lora_r=16)
        cfg = FinetuneConfig.from_dict({"model": "tiny", "lr": 1e-4})
    """

    # --- what to train -------------------------------------------------------------
    model: str = "tiny"  # a Hugging Face id, a local directory, or "tiny" (the embedded model)
    method: MethodName = "lora"  # see ftmagic/methods.py for what each method trains
    # LoRA is the default: it fits a 16 GB GPU for most models under 8B and trains fast.

    # --- data ----------------------------------------------------------------------
    data: Any = None  # path, HF dataset id, list of dicts, DataFrame, datasets.Dataset, or a list of {path, weight}
    eval_data: Any = None  # same kinds as `data`; when absent, `val_split` carves one out
    format: FormatName = "auto"
    columns: Optional[dict] = None  # column mapping that overrides detection, e.g. {"prompt": "question"}
    template: Optional[str] = None  # a named template for base models without a chat template
    system_prompt: Optional[str] = None  # prepended to every conversation that has none
    max_seq_len: int = 512  # longer examples are truncated (and counted)
    packing: bool = False  # concatenate short examples into full rows; no compute spent on padding
    train_on: Literal["completions", "all"] = "completions"  # loss on assistant turns only, or on every token
    val_split: float = 0.0  # share of `data` held out for evaluation when there is no `eval_data`

    # --- schedule ------------------------------------------------------------------
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs; counted in optimizer steps
    batch_size: int = 4  # micro-batch per step; effective batch = batch_size * grad_accum
    grad_accum: int = 1
    lr: float = 2e-4  # LoRA-scale default; full fine-tuning usually wants ~1e-5
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup: float = 0.03  # below 1: a share of the steps; from 1 up: a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off

    # --- adapters ------------------------------------------------------------------
    lora_r: int = 16
    lora_alpha: int = 32  # alpha / r = 2 is the common, stable scale
    lora_dropout: float = 0.05
    target_modules: Union[str, list] = "auto"  # "auto": every linear layer of the blocks (QLoRA paper)
    num_virtual_tokens: int = 16  # prompt and prefix tuning
    trainable_layers: int = 2  # `freeze`: how many top blocks (plus the head) train

    # --- device and memory ---------------------------------------------------------
    gradient_checkpointing: bool = False
    precision: PrecisionName = "auto"
    optimizer: OptimizerName = "adamw"
    device: DeviceName = "auto"
    skip_memory_check: bool = False  # run even when the pre-flight estimate says it will not fit

    # --- output, evaluation, checkpoints -------------------------------------------
    output_dir: str = "ftmagic-output"
    overwrite: bool = False  # allow writing over a finished run from a different config
    save_steps: int = 100  # 0: only the final save
    save_total_limit: int = 2  # older checkpoints are removed once a newer one is written
    eval_steps: int = 50  # 0: evaluate only at the end
    logging_steps: int = 0  # 0: auto (every step on CPU; on CUDA ~200 reads a run, as each read waits for the GPU)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0: off
    # Evaluation by generation: answer held-out prompts at every evaluation and score the answers.
    # Off until one of the two keys is set: generating costs far more than a loss pass.
    eval_prompts: Any = None  # a file, $records, plain prompt strings, or N records held out of `data`; unset: the validation split
    eval_metrics: Union[str, list, None] = None  # exact_match, contains, normalized_exact_match, rouge_l, chrf, or $function(prediction, reference)
    eval_max_new_tokens: int = 64  # per answer; greedy decoding stops earlier at EOS
    best_metric: str = "eval_loss"  # what "best" means for early stopping and the weights kept, e.g. exact_match
    seed: int = 42
    resume: bool = False  # continue from the newest good checkpoint in output_dir
    merge: bool = False  # also write the adapter merged into the base weights
    report_to: Union[str, list] = "none"  # none, tensorboard, wandb, mlflow, trackio, or a list (the fronts always show progress)

    # --- hyperparameter search ------------------------------------------------------
    sweep: Optional[dict] = None  # {config key: search space, n_trials, metric, direction, sampler}; see ftmagic/sweep_spec.py

    # --- export when the run ends (the same as `ftmagic export` / `%ft_export` afterwards) ----
    export: Union[str, list] = field(default_factory=list)  # any of merged, gguf, ollama, hub; none by default
    gguf_quant: Union[str, list] = "q8_0"  # GGUF types; q8_0 is near-lossless, half of f16, no compiled llama.cpp
    push_to_hub: Optional[str] = None  # `user/name`: upload the run (and what `export` made) with a model card
    hub_private: bool = True  # a new Hub repository starts private, so nothing is published by accident

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, values: Optional[dict] = None, *, source: Optional[str] = None,
                  lines: Optional[dict] = None, **overrides: Any) -> "FinetuneConfig":
        """Build and validate a config from a mapping (plus keyword overrides, which win).

        ``source`` and ``lines`` (key -> line number) make error messages point at the file
        and line the value came from.

        Example::

            FinetuneConfig.from_dict({"model": "tiny", "lora_r": 8}, lr=1e-4)
        """
        merged = dict(values or {})
        merged.update(overrides)
        if callable(merged.get("eval_metrics")):
            merged["eval_metrics"] = [merged["eval_metrics"]]  # one function is a list of one
        known = {f.name for f in dataclasses.fields(cls)}
        for key in merged:
            if key not in known:
                raise ConfigError(_where(source, lines, key) + f"unknown key `{key}`" + _suggest(key, known))
        coerced = {}
        for key, value in merged.items():
            coerced[key] = _coerce(key, value, _FIELD_TYPES[key], _where(source, lines, key))
        cfg = cls(**coerced)
        cfg.validate(source=source, lines=lines)
        return cfg

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "config", **overrides: Any) -> "FinetuneConfig":
        """Parse YAML text (a cell body or a file's content) into a validated config.

        Example::

            FinetuneConfig.from_yaml("model: tiny\\nepochs: 2\\n", source="run.yaml")
        """
        values, lines = parse_yaml_mapping(text, source)
        return cls.from_dict(values, source=source, lines=lines, **overrides)

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> "FinetuneConfig":
        """Read a YAML file into a validated config; errors name the file and line."""
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        return cls.from_yaml(text, source=str(path), **overrides)

    def to_dict(self) -> dict:
        """The config as plain values (data objects that are not plain become a short description,
        notebook functions their ``$name``, which reads back as the same reference)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "eval_metrics" and value is not None:
                value = [v if isinstance(v, str) else f"${getattr(v, '__name__', 'function')}"
                         for v in ([value] if isinstance(value, str) or callable(value) else value)]
            if f.name in ("data", "eval_data", "eval_prompts") and not _is_data_reference(value):
                value = describe_data(value)
            out[f.name] = value if _is_plain(value) else describe_data(value)
        return out

    def replace(self, **changes: Any) -> "FinetuneConfig":
        """A validated copy with some fields changed."""
        return type(self).from_dict({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes})

    # ------------------------------------------------------------------ validation
    def validate(self, *, source: Optional[str] = None, lines: Optional[dict] = None) -> None:
        """Check ranges and combinations; raise a one-line ConfigError on the first problem."""

        def fail(key: str, message: str) -> None:
            raise ConfigError(_where(source, lines, key) + message)

        for key in ("method", "format", "train_on", "scheduler", "precision", "optimizer", "device"):
            allowed = typing.get_args(_FIELD_TYPES[key])
            value = getattr(self, key)
            if value not in allowed:
                fail(key, f"`{key}: {value}` is not accepted; use one of {', '.join(allowed)}" + _suggest(str(value), allowed, quote=False))
        if not isinstance(self.model, str) or not self.model.strip():
            fail("model", "`model` must be a Hugging Face id, a local directory or `tiny`")
        if self.lr <= 0:
            fail("lr", f"`lr: {self.lr}` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)")
        if not 0 <= self.val_split < 1:
            fail("val_split", f"`val_split: {self.val_split}` must be in [0, 1), e.g. 0.1")
        for key, low in (("lora_r", 1), ("lora_alpha", 1), ("batch_size", 1), ("grad_accum", 1), ("max_seq_len", 8),
                         ("num_virtual_tokens", 1), ("trainable_layers", 0), ("logging_steps", 0)):
            if getattr(self, key) < low:
                fail(key, f"`{key}: {getattr(self, key)}` must be at least {low}")
        for key in ("save_steps", "eval_steps", "early_stopping_patience", "save_total_limit", "weight_decay",
                    "max_grad_norm", "warmup"):
            if getattr(self, key) < 0:
                fail(key, f"`{key}: {getattr(self, key)}` must not be negative")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", f"`lora_dropout: {self.lora_dropout}` must be in [0, 1)")
        if self.epochs <= 0 and self.max_steps <= 0:
            fail("epochs", f"`epochs: {self.epochs}` must be greater than 0 (or set `max_steps`)")
        if self.max_steps == 0 or self.max_steps < -1:
            fail("max_steps", f"`max_steps: {self.max_steps}` must be a positive number of steps, or -1 to use epochs")
        if isinstance(self.target_modules, str) and self.target_modules not in ("auto", "all-linear"):
            fail("target_modules", f"`target_modules: {self.target_modules}` must be `auto`, `all-linear` or a list of module names")
        if self.packing and not get_method_spec(self.method).packable:
            fail("packing", f"`packing: true` cannot be used with `method: {self.method}`: virtual tokens would be shared "
                            "across packed examples; set `packing: false`")
        if self.early_stopping_patience and not (self.eval_data is not None or self.val_split > 0
                                                 or self.generation_eval):
            fail("early_stopping_patience", "`early_stopping_patience` needs evaluation data: set `eval_data`, "
                                            "`val_split` or `eval_prompts`")
        self._validate_evaluation(fail)
        if self.method == "qlora" and self.precision == "fp32":
            fail("precision", "`precision: fp32` does not apply to `method: qlora` (4-bit weights compute in bf16/fp16); "
                              "use `precision: auto`")
        for name in ([self.report_to] if isinstance(self.report_to, str) else self.report_to):
            if name not in TRACKERS:
                fail("report_to", f"`report_to: {name}` is not accepted; use {', '.join(TRACKERS)} or a list of them"
                     + _suggest(str(name), TRACKERS, quote=False))
        self._validate_export(fail)
        if self.sweep is not None:
            from ftmagic.sweep_spec import parse_sweep

            parse_sweep(self.sweep, self, source=source, lines=lines)

    def _validate_evaluation(self, fail) -> None:
        from ftmagic.scoring import METRICS, check_metric_spec, metric_names

        value = self.eval_prompts
        if isinstance(value, str) and value.strip().isdigit():
            value = self.eval_prompts = int(value)  # `--eval-prompts 50` from a flag
        if isinstance(value, bool) or (isinstance(value, (int, float)) and (value < 1 or value != int(value))):
            fail("eval_prompts", f"`eval_prompts: {value}` must be a number of records to hold out (at least 1), "
                                 "a file, or records")
        if isinstance(value, float):
            self.eval_prompts = int(value)
        problem = check_metric_spec(self.eval_metrics)
        if problem:
            fail("eval_metrics", problem)
        if self.eval_max_new_tokens < 1:
            fail("eval_max_new_tokens", f"`eval_max_new_tokens: {self.eval_max_new_tokens}` must be at least 1")
        names = metric_names(self.eval_metrics)
        if self.best_metric != "eval_loss" and self.best_metric in METRICS and self.best_metric not in names:
            fail("best_metric", f"`best_metric: {self.best_metric}` is not computed; add it to `eval_metrics` "
                                f"(now: {', '.join(names) or 'none'})")

    def _validate_export(self, fail) -> None:
        from ftmagic.export.targets import check_quants, check_targets

        for key, check in (("export", check_targets), ("gguf_quant", check_quants)):
            try:
                chosen = check(getattr(self, key), key)
            except ConfigError as exc:
                fail(key, str(exc))
        if not chosen:
            fail("gguf_quant", "`gguf_quant` is empty; give at least one GGUF type, e.g. `gguf_quant: q8_0`")
        if self.push_to_hub is not None and not _is_repo_id(self.push_to_hub):
            fail("push_to_hub", f"`push_to_hub: {self.push_to_hub}` must be a Hub repository id like `user/name`")
        if "hub" in check_targets(self.export) and not self.push_to_hub:
            fail("export", "`export: hub` needs `push_to_hub: user/name` to know where to upload")

    # ------------------------------------------------------------------ helpers
    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def generation_eval(self) -> bool:
        """Whether evaluations also generate answers and score them (``eval_prompts`` or ``eval_metrics`` set)."""
        return self.eval_prompts is not None or bool(metric_names_of(self.eval_metrics))

    @property
    def metric_names(self) -> list:
        """The names evaluation by generation reports (``exact_match`` when only prompts are given)."""
        names = metric_names_of(self.eval_metrics)
        return names or (["exact_match"] if self.eval_prompts is not None else [])

    @property
    def is_adapter_method(self) -> bool:
        return get_method_spec(self.method).adapter


# --------------------------------------------------------------------------- parsing


def parse_yaml_mapping(text: str, source: str = "config") -> tuple[dict, dict]:
    """Parse YAML text into (mapping, key -> line number); errors name the source and line.

    Example::

        >>> parse_yaml_mapping("lr: 0.1\\nseed: 3\\n")
        ({'lr': 0.1, 'seed': 3}, {'lr': 1, 'seed': 2})
    """
    import yaml  # pyyaml is light; imported here to keep `import ftmagic` quick

    if not text or not text.strip():
        return {}, {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # The context mark points at the construct that was left open (an unclosed `[`), which
        # is where the user has to look; the problem mark is often just the end of the text.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}: " if mark is not None else f"{source}: "
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}invalid YAML ({problem}); write one `key: value` per line") from None
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}:1: the config must be a mapping of `key: value` lines, not a {type(values).__name__}")
    lines = {}
    for key_node, value_node in getattr(node, "value", []):
        lines[key_node.value] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            # One level deeper (`sweep.lr`), so an error inside a block names its own line.
            for sub_node, _ in value_node.value:
                lines[f"{key_node.value}.{sub_node.value}"] = sub_node.start_mark.line + 1
    return values, lines


def _is_repo_id(value: str) -> bool:
    parts = str(value).split("/")
    return len(parts) == 2 and all(p and not any(c.isspace() for c in p) for p in parts)


# Resolved field types (the module uses postponed annotations).
_FIELD_TYPES = typing.get_type_hints(FinetuneConfig)


def _where(source: Optional[str], lines: Optional[dict], key: str) -> str:
    if source and lines and key in lines:
        return f"{source}:{lines[key]}: "
    if source:
        return f"{source}: "
    return ""


def _suggest(word: str, options, quote: bool = True) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean `{close[0]}`?" if quote else f" (did you mean {close[0]}?)"


def _coerce(key: str, value: Any, annotation: Any, where: str) -> Any:
    """Turn strings from flags and `--set` into the field's type; reject wrong types."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        return value if not isinstance(value, str) else value.strip()
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}`{key}: {value!r}` must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}`{key}: {value}` must be a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}`{key}: {value!r}` must be a whole number")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}`{key}: {value}` must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}`{key}: {value!r}` must be a number, e.g. 2e-4")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}`{key}: {value!r}` must be a string")
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}`{key}: {value!r}` must be a list")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}`{key}: {value!r}` must be a mapping")
    return value


def metric_names_of(spec) -> list:
    from ftmagic.scoring import metric_names

    return metric_names(spec)


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _is_data_reference(value: Any) -> bool:
    """True for data given by reference (a path, an id, a list of weighted sources), not records."""
    if value is None or isinstance(value, (str, int)):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, str) or (isinstance(v, dict) and set(v) <= set(DATA_SOURCE_KEYS) and _is_plain(v)) for v in value)
    return False


def describe_data(value: Any) -> str:
    """A short, stable description of an in-memory dataset (for saved configs and summaries)."""
    kind = type(value).__name__
    try:
        size = len(value)
    except TypeError:
        return f"<{kind}>"
    return f"<{kind} with {size} records>"


def config_fields() -> list[dataclasses.Field]:
    """The config's fields, in declaration order (flags and docs are generated from them)."""
    return list(dataclasses.fields(FinetuneConfig))

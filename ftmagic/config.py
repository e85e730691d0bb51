"""The one configuration object of a run.

A YAML cell body, magic flags, CLI ``--set`` pairs and Python keyword arguments are four
spellings of the same fields: ``--lora-r 16`` == ``lora_r: 16`` == ``lora_r=16``. All
validation lives in :meth:`FinetuneConfig.validate`, so every front gets the same
:class:`~ftmagic.errors.ConfigError`: one line per problem, all problems at once.

Example::

    >>> from ftmagic.config import FinetuneConfig
    >>> cfg = FinetuneConfig.from_yaml("model: tiny\\nmethod: lora\\nlora_r: 8\\n")
    >>> cfg.lora_r, cfg.method
    (8, 'lora')
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from ftmagic.constants import DATA_ACCEPTED, DATA_SOURCE_KEYS, DEVICES, OPTIMIZERS, PRECISIONS
from ftmagic.errors import ConfigError, a_type, did_you_mean, not_accepted
from ftmagic.methods import METHOD_NAMES, get_method_spec
from ftmagic.objectives import DPO_LOSSES, OBJECTIVE_NAMES, get_objective_spec, method_supports
from ftmagic.strategies import STRATEGY_NAMES, check_batch_split, resolve_strategy

# `report_to` trackers (ftmagic/engine/reporting.py has how each is written).
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "preference", "prompt_completion", "classification", "text")
LONG_TEXT_MODES = ("split", "truncate")  # `long_text`: what becomes of a `text` record longer than max_seq_len

# The accepted values of the choice keys, built from their one home (the method table, the
# constants): `typing.Literal` of a tuple lists the tuple's items.
MethodName = Literal[METHOD_NAMES]
FormatName = Literal[FORMATS]
OptimizerName = Literal[OPTIMIZERS]
PrecisionName = Literal[PRECISIONS]
DeviceName = Literal[DEVICES]
ObjectiveName = Literal[OBJECTIVE_NAMES]
DpoLossName = Literal[DPO_LOSSES]
StrategyName = Literal[STRATEGY_NAMES]


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run, with defaults that suit one Colab-class GPU.

    Example::

        cfg = FinetuneConfig(model="tiny", data="train.jsonl", method="qlora", lora_r=16)
        cfg = FinetuneConfig.from_dict({"model": "tiny", "lr": 1e-4})
    """

    # --- what to train -------------------------------------------------------------
    model: str = "tiny"  # a Hugging Face id, a local directory, or "tiny" (the embedded model)
    # An earlier run's output_dir (a saved adapter) to keep training; `model:` may point at one too.
    # Its method and settings are kept, and its base is read from the folder when `model` is left at tiny.
    adapter: Optional[str] = None
    # A model whose folder ships its own Python code runs it only when this is true: off by
    # default because loading a model must never execute a stranger's code unasked.
    trust_remote_code: bool = False
    method: MethodName = "lora"  # see ftmagic/methods.py for what each method trains
    # LoRA is the default: it fits a 16 GB GPU for most models under 8B and trains fast.

    # --- objective (what the run optimises; ftmagic/objectives.py) ---------------------
    objective: ObjectiveName = "sft"  # sft, or after it: dpo | orpo (preference pairs), reward | classify (a head)
    beta: float = 0.1  # DPO: how far the policy may move from the reference (TRL's and the paper's default)
    dpo_loss: DpoLossName = "sigmoid"  # sigmoid: the DPO paper's loss; ipo: IPO's squared loss (noisy preferences)
    orpo_lambda: float = 0.1  # ORPO: weight of the odds-ratio term beside the NLL (the ORPO paper's default)
    labels: Optional[list] = None  # classify: label names in index order; default: sorted from the data

    # --- data ----------------------------------------------------------------------
    data: Any = None  # path, HF dataset id, list of dicts, DataFrame, datasets.Dataset, or a list of {path, weight}
    eval_data: Any = None  # same kinds as `data`; when absent, `val_split` carves one out
    format: FormatName = "auto"
    columns: Optional[dict] = None  # column mapping that overrides detection, e.g. {"prompt": "question"}
    template: Optional[str] = None  # a named template for base models without a chat template
    system_prompt: Optional[str] = None  # prepended to every conversation that has none
    max_seq_len: int = 512  # longer chat examples are truncated (and counted)
    # `text` records longer than max_seq_len: `split` into max_seq_len blocks, so continual
    # pre-training on long documents trains every token; `truncate` keeps only the first block.
    long_text: Literal[LONG_TEXT_MODES] = "split"
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
    # A loss or gradient that is NaN or infinite (too high an lr, bad data): `stop` ends the run
    # with the weights of the last finite checkpoint, so nothing non-finite is ever saved; `skip`
    # drops that step's update and goes on (it reads the loss every step, one device sync each).
    on_nan: Literal["stop", "skip"] = "stop"

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
    # CPU threads torch computes with during the run ("auto" or a number; set back afterwards). "auto":
    # the cores free when the run starts, fewer for a small model; torch's default of one per core
    # runs many times slower when other work holds some of them (ftmagic/engine/threads.py).
    threads: Union[int, str] = "auto"

    # --- several processes (GPUs or machines) ---------------------------------------
    # 1 runs in this process. N > 1 starts N processes through accelerate (one per GPU, or
    # CPU processes without one); under `accelerate launch` or `torchrun` the launcher's
    # processes are used and this stays 1 (or names their count). batch_size x grad_accum
    # stays the batch of one step whatever N is (see ftmagic/strategies.py).
    processes: int = 1
    distributed: StrategyName = "auto"  # auto: DDP for adapters, FSDP for full fine-tuning on GPUs

    # --- output, evaluation, checkpoints -------------------------------------------
    output_dir: str = "ftmagic-output"  # `~` is expanded
    overwrite: bool = False  # replace another run's outputs here (only files ftmagic wrote are ever removed)
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
                  lines: Optional[dict] = None, override_label: Optional[Callable[[str], str]] = None,
                  problems: Optional["Problems"] = None, **overrides: Any) -> "FinetuneConfig":
        """Build and validate a config from a mapping (plus keyword overrides, which win).

        ``source`` and ``lines`` (key -> line number) make error messages point at the file
        and line the value came from; ``override_label(key)`` names where an override came
        from (``"--lora-r"``, ``"--set"``). Every problem is reported at once: one
        ConfigError, one line per problem, in the order of the lines; ``problems`` may
        bring some found before (a ``$variable`` that does not exist).

        Example::

            FinetuneConfig.from_dict({"model": "tiny", "lora_r": 8}, lr=1e-4)
        """
        merged = dict(values or {})
        merged.update(overrides)
        if callable(merged.get("eval_metrics")):
            merged["eval_metrics"] = [merged["eval_metrics"]]  # one function is a list of one
        if "target_modules" in merged:
            merged["target_modules"] = module_names(merged["target_modules"])
        if problems is None:
            problems = Problems(source, lines, {key: override_label(key) for key in overrides} if override_label else {})
        known = {f.name for f in dataclasses.fields(cls)}
        coerced = {}
        for key, value in merged.items():
            if key not in known:
                problems.add(key, f"unknown key `{key}`" + did_you_mean(key, known))
                continue
            try:
                coerced[key] = _coerce(key, value, _FIELD_TYPES[key], "")
            except ConfigError as exc:
                problems.add(key, str(exc) + (_variable_hint(key, value) if "cell" in str(source) else ""))
        cfg = cls(**coerced)  # keys that failed keep their default, so the others are still checked
        cfg._check(problems)
        problems.raise_if_any()
        return cfg

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "config", first_line: int = 1,
                  override_label: Optional[Callable[[str], str]] = None, **overrides: Any) -> "FinetuneConfig":
        """Parse YAML text (a cell body or a file's content) into a validated config.

        ``first_line`` is the line number of the text's first line where the user sees it
        (2 for a cell body under its magic line).

        Example::

            FinetuneConfig.from_yaml("model: tiny\\nepochs: 2\\n", source="run.yaml")
        """
        values, lines = parse_yaml_mapping(text, source, first_line=first_line)
        return cls.from_dict(values, source=source, lines=lines, override_label=override_label, **overrides)

    @classmethod
    def from_file(cls, path: str, *, override_label: Optional[Callable[[str], str]] = None,
                  **overrides: Any) -> "FinetuneConfig":
        """Read a YAML file into a validated config; errors name the file and line.

        Example::

            FinetuneConfig.from_file("run.yaml", override_label=lambda key: "--set", lr=1e-4)
        """
        try:
            with open(os.path.expanduser(path), "rb") as handle:
                raw = handle.read(MAX_YAML_CHARS * 4 + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        text = _decode_config(raw, str(path))
        return cls.from_yaml(text, source=str(path), override_label=override_label, **overrides)

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
        """Check ranges and combinations; raise one ConfigError listing every problem (one line each)."""
        problems = Problems(source, lines)
        self._check(problems)
        problems.raise_if_any()

    def _check(self, problems: "Problems") -> None:
        """Add a problem for each value or combination that is not accepted.

        A new check is one ``fail(key, message)`` call; keys that already have a problem
        (a value that could not even be read) are not judged again.
        """
        fail = problems.add

        for key in ("method", "format", "train_on", "scheduler", "precision", "optimizer", "device", "long_text",
                    "on_nan", "distributed", "objective", "dpo_loss"):
            allowed = typing.get_args(_FIELD_TYPES[key])
            value = getattr(self, key)
            if value not in allowed:
                fail(key, str(not_accepted(key, value, allowed)))
        if not isinstance(self.model, str) or not self.model.strip():
            fail("model", "`model` must be a Hugging Face id, a local directory or `tiny`")
        for key in ("data", "eval_data", "eval_prompts"):  # an empty value would be read as a file named ""
            if isinstance(getattr(self, key), str) and not getattr(self, key).strip():
                fail(key, f"`{key}` is empty; give " + ("a number of records to hold out, " if key == "eval_prompts" else "")
                          + "a file, folder, dataset id or `$variable`" + ("" if key == "data" else ", or leave it out"))
        for key in ("data", "eval_data"):  # a mixture's entries, judged before anything is read
            if isinstance(getattr(self, key), (list, tuple)):
                from ftmagic.data.pipeline import source_problems

                for i, message in source_problems(getattr(self, key), key):
                    fail(f"{key}[{i}]", message)
        for key, (low, high) in NUMBER_RANGES.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # a type mistake is reported where the value was coerced
            if isinstance(value, float) and not math.isfinite(value):
                fail(key, f"`{key}: {value}` must be a finite number, from {_short_number(low)} to {_short_number(high)}")
            elif value > high:
                fail(key, f"`{key}: {_short_number(value)}` must be at most {_short_number(high)}")
            elif value < low and key not in _OWN_LOWER_CHECK:
                fail(key, f"`{key}: {_short_number(value)}` " + (f"must be at least {low}" if low else "must not be negative"))
        if self.lr <= 0:
            fail("lr", f"`lr: {self.lr}` must be greater than 0 (typical: 2e-4 for LoRA, 1e-5 for full)")
        if not 0 <= self.val_split < 1:
            fail("val_split", f"`val_split: {self.val_split}` must be in [0, 1), e.g. 0.1")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", f"`lora_dropout: {self.lora_dropout}` must be in [0, 1)")
        if self.epochs <= 0 and self.max_steps <= 0:
            fail("epochs", f"`epochs: {self.epochs}` must be greater than 0 (or set `max_steps`)")
        if self.max_steps == 0 or self.max_steps < -1:
            fail("max_steps", f"`max_steps: {self.max_steps}` must be a positive number of steps, or -1 to use epochs")
        if isinstance(self.target_modules, str) and self.target_modules not in ("auto", "all-linear"):
            fail("target_modules", f"`target_modules: {self.target_modules}` must be `auto`, `all-linear` or a list of module names")
        if self.packing and self.method in METHOD_NAMES and not get_method_spec(self.method).packable:
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
        if (isinstance(self.threads, str) and self.threads != "auto") or \
                (isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads < 1):
            fail("threads", f"`threads: {self.threads}` must be `auto` or a number of threads from 1 up")
        try:
            check_batch_split(self.batch_size, self.processes)
            if self.device == "cpu":
                resolve_strategy(self.distributed, method=self.method, device="cpu")
        except ConfigError as exc:
            fail("batch_size" if "batch_size" in str(exc) else "distributed", str(exc))
        for name in ([self.report_to] if isinstance(self.report_to, str) else self.report_to):
            if name not in TRACKERS:
                fail("report_to", str(not_accepted("report_to", name, TRACKERS, also="or a list of them")))
        self._validate_objective(fail)
        self._validate_export(fail)
        if self.sweep is not None:
            from ftmagic.sweep_spec import parse_sweep

            try:
                parse_sweep(self.sweep, self, source=problems.source, lines=problems.lines)
            except ConfigError as exc:  # each already located at its line inside the block
                for i, message in enumerate(exc.problems):
                    problems.add(f"sweep#{i}", message, located=True, line=problems.lines.get("sweep"))

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

    def _validate_objective(self, fail) -> None:
        """The objective's keys, and what it accepts of the method, data format and packing."""
        if self.objective not in OBJECTIVE_NAMES:
            return  # reported with the other choice keys; nothing below can be judged without it
        spec = get_objective_spec(self.objective)
        if self.method in METHOD_NAMES and not method_supports(get_method_spec(self.method), self.objective):
            able = [name for name in METHOD_NAMES if method_supports(get_method_spec(name), self.objective)]
            fail("objective", f"`objective: {self.objective}` cannot be trained with `method: {self.method}` "
                              f"(virtual tokens live inside peft's own forward); use one of {', '.join(able)}")
        if not self.beta > 0:
            fail("beta", f"`beta: {self.beta}` must be greater than 0 (typical: 0.1)")
        if self.orpo_lambda < 0:
            fail("orpo_lambda", f"`orpo_lambda: {self.orpo_lambda}` must not be negative (typical: 0.1)")
        if self.packing and self.objective != "sft":
            fail("packing", f"`packing: true` applies to `objective: sft`; {self.objective} already trains "
                            "without padding (every micro-batch is one unpadded row)")
        if self.train_on != "completions" and spec.data == "preference":
            fail("train_on", f"`train_on: {self.train_on}` applies to `objective: sft`; {self.objective} compares "
                             "the completions of each pair")
        from ftmagic.data.formats import format_kind

        if self.format != "auto" and format_kind(self.format) != spec.data:
            fail("format", f"`format: {self.format}` holds {format_kind(self.format)} records, but "
                           f"`objective: {self.objective}` trains on {spec.data} records; use `format: auto`")
        if self.labels is not None:
            if self.objective != "classify":
                fail("labels", "`labels` applies to `objective: classify`")
            names = [str(v) for v in self.labels]
            if len(names) < 2 or len(set(names)) != len(names):
                fail("labels", f"`labels: {self.labels}` must list at least two distinct label names")

    def _validate_export(self, fail) -> None:
        from ftmagic.export.targets import REPO_ID_RULE, check_quants, check_targets, is_repo_id, refuse_text_targets

        for key, check in (("export", check_targets), ("gguf_quant", check_quants)):
            try:
                chosen = check(getattr(self, key), key)
            except ConfigError as exc:
                fail(key, str(exc))
        if not chosen:
            fail("gguf_quant", "`gguf_quant` is empty; give at least one GGUF type, e.g. `gguf_quant: q8_0`")
        if self.push_to_hub is not None and not is_repo_id(self.push_to_hub):
            fail("push_to_hub", f"`push_to_hub: {self.push_to_hub}` must be {REPO_ID_RULE}")
        if "hub" in check_targets(self.export) and not self.push_to_hub:
            fail("export", "`export: hub` needs `push_to_hub: user/name` to know where to upload")
        if self.objective in OBJECTIVE_NAMES:
            try:
                refuse_text_targets(check_targets(self.export), self.objective, spelled="export: {}", error=ConfigError)
            except ConfigError as exc:
                fail("export", str(exc))

    def check_trainable(self) -> None:
        """Refuse, in one line, a valid config that cannot train one run as it stands.

        Checked before any process starts, so a run of several processes says it once.

        Example::

            >>> FinetuneConfig(model="tiny").check_trainable()
            Traceback (most recent call last):
            ftmagic.errors.ConfigError: `data` is not set: give a file path, a Hugging Face dataset id or a list of records
        """
        if self.sweep is not None:
            raise ConfigError("`sweep:` searches over many runs: use `ftmagic.sweep(...)`, `ftmagic sweep CONFIG.yaml` "
                              "or a %%finetune cell; or remove the `sweep:` block to train once")
        if self.data is None:
            raise ConfigError(f"`data` is not set: give {DATA_ACCEPTED}")

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


# Every numeric key, with the range it must fall in (both ends included). Upper bounds are far
# above any real run and are there so a typo (`lora_r: 1e23`) fails here, before anything is
# allocated, instead of deep in torch.
_STEPS = 2**31 - 1  # counts of steps and evaluations: a 32-bit int, more than any run takes
NUMBER_RANGES = {
    "seed": (0, 2**32 - 1),  # numpy's seed range; torch and python accept it too
    "lr": (0.0, 1e6), "weight_decay": (0.0, 1e6), "max_grad_norm": (0.0, 1e12),
    "warmup": (0.0, _STEPS), "epochs": (0.0, 1e6),  # val_split and lora_dropout: checked in validate()
    "max_steps": (-1, _STEPS), "save_steps": (0, _STEPS), "eval_steps": (0, _STEPS), "logging_steps": (0, _STEPS),
    "save_total_limit": (0, 1_000_000), "early_stopping_patience": (0, 1_000_000),
    # Sizes that allocate: one micro-batch row count, micro-batches held per optimizer step,
    # tokens per example (1M tokens), adapter ranks, virtual tokens and layers.
    "batch_size": (1, 65_536), "grad_accum": (1, 4_096), "max_seq_len": (8, 2**20),
    "lora_r": (1, 65_536), "lora_alpha": (1, 2**20), "num_virtual_tokens": (1, 65_536), "trainable_layers": (0, 65_536),
    "processes": (1, 65_536),  # one per GPU, across every machine of the run
}


def check_whole_number(key: str, value: Any) -> int:
    """``value`` for a whole-number key of :data:`NUMBER_RANGES` outside a config (the previewer's
    ``max_seq_len``, say), refused in the words the config uses.

    Example::

        >>> check_whole_number("max_seq_len", 256)
        256
        >>> check_whole_number("max_seq_len", 0)
        Traceback (most recent call last):
        ...
        ftmagic.errors.ConfigError: `max_seq_len: 0` must be at least 8
    """
    low, high = NUMBER_RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"`{key}: {value!r}` must be a whole number from {low} to {_short_number(high)}")
    if value < low:
        raise ConfigError(f"`{key}: {_short_number(value)}` must be at least {low}")
    if value > high:
        raise ConfigError(f"`{key}: {_short_number(value)}` must be at most {_short_number(high)}")
    return value


# Keys whose lower end has a message of its own in FinetuneConfig.validate.
_OWN_LOWER_CHECK = ("lr", "epochs", "max_steps")


def _short_number(value) -> str:
    """``1e+23`` rather than 24 digits; small values as written."""
    if isinstance(value, int) and abs(value) >= 10**12:
        try:
            return f"{float(value):.3g}"
        except OverflowError:
            return f"a {len(str(abs(value)))}-digit number"
    if isinstance(value, float) and abs(value) >= 1e5:
        return f"{value:g}"
    return str(value)


def _shown(value) -> str:
    """A value as a message quotes it: never more than a line, whatever was passed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _short_number(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- parsing


MAX_YAML_CHARS = 8 * 2**20  # a config is a few KB; records written inline in it stay far below this
MAX_YAML_NODES = 1_000_000  # values after expanding `*alias` references (an alias bomb expands to billions)
MAX_YAML_DEPTH = 100  # nesting levels; a config needs under ten


def load_yaml(text: str, source: str = "config"):
    """Parse YAML text safely: plain data only (no python tags), bounded size, nesting and alias expansion.

    Raises a one-line :class:`ConfigError` naming ``source`` and the line.

    Example::

        >>> load_yaml("a: [1, 2]")
        {'a': [1, 2]}
    """
    return _load_yaml_node(text, source)[0]


def _load_yaml_node(text: str, source: str, first_line: int = 1):
    import yaml  # pyyaml is light; imported here to keep `import ftmagic` quick

    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{source}: the YAML is {len(text) / 2**20:.1f} MiB, over the {MAX_YAML_CHARS // 2**20} MiB "
                          "a config may have; put data in a file and give its path as `data`")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_yaml_size(node, source, first_line)
        _refuse_repeated_keys(node, source, first_line)  # before construction merges `<<:` keys into the node
        return loader.construct_document(node), node
    except yaml.YAMLError as exc:
        # The context mark points at the construct that was left open (an unclosed `[`), which
        # is where the user has to look; the problem mark is often just the end of the text.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        # A mark at the end of the text (an unclosed `[` found only there) is shown on the
        # last line the user wrote, not on an empty line after it.
        last_written = max((i for i, line in enumerate(text.splitlines()) if line.strip()), default=0)
        where = f"{source}:{min(mark.line, last_written) + first_line}: " if mark is not None else f"{source}: "
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}invalid YAML ({problem}); write one `key: value` per line") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read (at most {MAX_YAML_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (4300 digits)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: a value cannot be read ({str(exc).splitlines()[0][:120]}); "
                          "numbers must be at most a few dozen digits") from None
    finally:
        loader.dispose()


def _refuse_repeated_keys(root, source: str, first_line: int = 1) -> None:
    """A key written twice in the config or in one of its blocks (`sweep:`): YAML keeps the last
    one silently, so one of them is a mistake. Keys merged in with ``<<: *anchor`` may be
    written again: that is how a merge is overridden."""
    import yaml

    def check(node, prefix: str) -> None:
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = prefix + str(key_node.value), key_node.start_mark.line + first_line
            if key in seen:
                raise ConfigError(f"{source}:{line}: `{key}` is given twice (also on line {seen[key]}); keep one")
            seen[key] = line
            if not prefix and isinstance(value_node, yaml.MappingNode):
                check(value_node, key + ".")

    if isinstance(root, yaml.MappingNode):
        check(root, "")


def _check_yaml_size(root, source: str, first_line: int = 1) -> None:
    """Count the values the document expands to (aliases counted at every use) without building them."""
    import yaml

    sizes: dict = {}

    def size(node, depth: int) -> int:
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}:{node.start_mark.line + first_line}: the YAML is nested more than {MAX_YAML_DEPTH} "
                              "levels deep (or an alias refers to itself); write the values out")
        key = id(node)
        if key in sizes:
            return sizes[key]
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{source}:{node.start_mark.line + first_line}: the YAML expands to more than {MAX_YAML_NODES:,} "
                              "values (`*alias` references repeat a block); write the values out")
        sizes[key] = total
        return total

    size(root, 0)


def parse_yaml_mapping(text: str, source: str = "config", first_line: int = 1) -> tuple[dict, dict]:
    """Parse YAML text into (mapping, key -> line number); errors name the source and line.

    ``first_line`` is the number of the text's first line as the user sees it: a
    ``%%finetune`` body starts on the cell's line 2, under the magic line.

    Example::

        >>> parse_yaml_mapping("lr: 0.1\\nseed: 3\\n")
        ({'lr': 0.1, 'seed': 3}, {'lr': 1, 'seed': 2})
    """
    if not text or not text.strip():
        return {}, {}
    values, node = _load_yaml_node(text, source, first_line)
    if values is None:
        return {}, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}:{first_line}: the config must be a mapping of `key: value` lines, not {a_type(values)}")
    import yaml

    lines: dict = {}  # keys written twice were refused while loading; a key merged in (`<<:`) comes
    # first in the constructed node, so the line of a key written over it is the one kept
    for key_node, value_node in getattr(node, "value", []):
        lines[str(key_node.value)] = key_node.start_mark.line + first_line
        if isinstance(value_node, yaml.MappingNode):
            # One level deeper (`sweep.lr`), so an error inside a block names its own line.
            for sub_node, _ in value_node.value:
                lines[f"{key_node.value}.{sub_node.value}"] = sub_node.start_mark.line + first_line
        elif isinstance(value_node, yaml.SequenceNode):  # a list's entries (`data[1]`), for the same reason
            for i, item in enumerate(value_node.value):
                lines[f"{key_node.value}[{i}]"] = item.start_mark.line + first_line
    return values, lines


# Resolved field types (the module uses postponed annotations).
_FIELD_TYPES = typing.get_type_hints(FinetuneConfig)
# Typical values of the number keys whose default (0) means "off", for error messages.
_NUMBER_EXAMPLES_WHEN_OFF = {"val_split": 0.1, "weight_decay": 0.01}


def _number_example(key: str) -> str:
    """A value to show for ``key`` when a number was expected: its default, or a typical one
    where the default turns it off.

    Example::

        >>> _number_example("lr"), _number_example("epochs"), _number_example("weight_decay")
        ('0.0002', '1', '0.01')
    """
    field = next((f for f in dataclasses.fields(FinetuneConfig) if f.name == key), None)
    default = field.default if field is not None else None
    if not isinstance(default, (int, float)) or isinstance(default, bool) or not default:
        default = _NUMBER_EXAMPLES_WHEN_OFF.get(key)
    return f"{default:g}" if default is not None else ""


class Problems:
    """The problems found in one config, each located where the user wrote the value.

    ``add(key, message)`` records one; :meth:`raise_if_any` raises them together as one
    ConfigError, ordered by line (values without a line, such as flags, come last).

    Example::

        problems = Problems("run.yaml", {"lr": 3})
        problems.add("lr", "`lr: 0` must be greater than 0")
        problems.raise_if_any()   # ConfigError: run.yaml:3: `lr: 0` must be greater than 0
    """

    def __init__(self, source: Optional[str] = None, lines: Optional[dict] = None,
                 labels: Optional[dict] = None) -> None:
        self.source, self.lines, self.labels = source, lines or {}, labels or {}
        self.found: list[tuple[float, int, str]] = []
        self.keys: set = set()

    def where(self, key: str) -> str:
        """``"run.yaml:3: "``, ``"--lora-r: "`` (an override) or ``""``."""
        if key in self.labels:
            return f"{self.labels[key]}: "
        if self.source and key in self.lines:
            return f"{self.source}:{self.lines[key]}: "
        return f"{self.source}: " if self.source else ""

    def add(self, key: str, message: str, located: bool = False, line: Optional[int] = None) -> None:
        """Note ``message`` about ``key``; ``located``: it already names its file and line (``line``
        then orders it among the others)."""
        if key in self.keys:
            return  # one problem per key: the first one found is the one to fix
        self.keys.add(key)
        if line is None:
            line = self.lines.get(key) if key not in self.labels else None
        self.found.append((line if line is not None else math.inf, len(self.found),
                           message if located else self.where(key) + message))

    def raise_if_any(self) -> None:
        if self.found:
            raise ConfigError(problems=[message for _, _, message in sorted(self.found)])


def _decode_config(raw: bytes, source: str) -> str:
    """A config file's text: UTF-8 (a BOM is fine); anything else is one line saying where and what to do."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{source}: the file is UTF-16; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: bytes that are not UTF-8 (byte {exc.start + 1}); save the file as UTF-8") from None



def flag_name(key: str) -> str:
    """The magic's and CLI's flag for a config key: ``lora_r`` -> ``--lora-r``."""
    return "--" + key.replace("_", "-")


def _variable_hint(key: str, value: Any) -> str:
    """What a refused ``{name}`` meant: YAML reads ``max_steps: {steps}`` as the mapping ``{steps: None}``,
    while a notebook's variables are read on the magic's line (and as ``$name`` in the data keys)."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value.values())) is None:
        name = next(iter(value))
        return (f" (YAML reads `{{{name}}}` as a mapping, not the variable `{name}`: write the value, or give it on "
                f"the %%finetune line, `{flag_name(key)} {{{name}}}`, where notebook variables are read)")
    return ""


def module_names(value: Any) -> Any:
    """``target_modules`` as the config keeps it: ``auto``/``all-linear``, or a list of module names;
    a comma list or one name (``q_proj,v_proj``, ``q_proj``), as a flag or ``--set`` gives it, is that list.

    Example::

        >>> module_names("q_proj, v_proj"), module_names("auto"), module_names(["o_proj"])
        (['q_proj', 'v_proj'], 'auto', ['o_proj'])
    """
    if isinstance(value, str) and value.strip() not in ("auto", "all-linear"):
        names = [part.strip() for part in value.split(",") if part.strip()]
        return names or value  # an empty text stays as it was, refused by the check
    return value.strip() if isinstance(value, str) else value


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
        raise ConfigError(f"{where}`{key}: {_shown(value)}` must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}`{key}: {value}` must be a whole number")
        if isinstance(value, str) and len(value) <= 100:
            try:
                return int(value.strip())
            except ValueError:
                try:  # `1e3` from a flag or YAML (which reads it as text) is a whole number too
                    value = float(value.strip())
                except ValueError:
                    pass
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}`{key}: {_shown(value)}` must be a whole number")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}`{key}: {value}` must be a number")
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{where}`{key}: {_short_number(value)}` is too large for a number") from None
        if isinstance(value, str) and len(value) <= 100:
            try:
                return float(value.strip())
            except ValueError:
                pass
        example = _number_example(key)
        raise ConfigError(f"{where}`{key}: {_shown(value)}` must be a number" + (f", e.g. {example}" if example else ""))
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}`{key}: {_shown(value)}` must be a string")
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}`{key}: {_shown(value)}` must be a list")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}`{key}: {_shown(value)}` must be a mapping")
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

"""What a saved adapter folder says: its base model, its method and its settings (pure Python).

Sequential fine-tuning starts a second stage from the first stage's ``output_dir``: either
``model:`` points at that folder, or ``adapter:`` does (with ``model:`` the base). peft
writes ``adapter_config.json`` there (its tuner, rank, targets and the base it was trained
on) and ftmagic writes ``ftmagic_run.json`` (the base it really loaded and the method, so a
QLoRA adapter is told from a LoRA one). :func:`plan_continuation` reads both and returns
the config the second stage runs with: ``model`` the base, ``adapter`` the folder, and the
adapter's method and settings, since a LoRA adapter of rank 8 cannot continue as rank 16
or as IA3. Its saved ``config.yaml`` then says exactly what was trained on what.

Example::

    >>> from ftmagic.adapters import read_adapter  # doctest: +SKIP
    >>> saved = read_adapter("runs/stage1")        # doctest: +SKIP
    >>> saved.base, saved.method, saved.settings   # doctest: +SKIP
    ('HuggingFaceTB/SmolLM2-135M', 'lora', {'lora_r': 8, 'lora_alpha': 16, ...})
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from ftmagic.constants import RUN_FILE
from ftmagic.errors import ConfigError, ModelError
from ftmagic.methods import get_method_spec

ADAPTER_CONFIG = "adapter_config.json"  # what peft writes beside an adapter's weights

# peft's tuner -> ftmagic's method (DoRA is LoRA with `use_dora`).
_PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning"}


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter saved by an earlier run (or by peft): where, on what base, which method, which settings."""

    path: str
    base: str  # the base model it was trained on: a Hugging Face id, a local folder, or `tiny`
    method: str  # an adapter method of ftmagic.methods
    settings: dict = field(default_factory=dict)  # FinetuneConfig fields the adapter fixes (lora_r, ...)
    # The objective whose head was saved with the adapter (`reward`, `classify`), or None for an adapter of the
    # language model itself (sft, dpo, orpo), which any objective may continue (a head objective adds a new head).
    head_objective: Optional[str] = None
    labels: Optional[list] = None  # a classifier's label names, in the order of its head's outputs

    def describe(self) -> str:
        """Its settings in a few words, for messages: ``r 8, alpha 16, on k_proj, q_proj, v_proj``."""
        parts = []
        if "lora_r" in self.settings:
            parts.append(f"r {self.settings['lora_r']}, alpha {self.settings['lora_alpha']}")
        if "num_virtual_tokens" in self.settings:
            parts.append(f"{self.settings['num_virtual_tokens']} virtual tokens")
        targets = self.settings.get("target_modules")
        if isinstance(targets, list):
            parts.append("on " + ", ".join(targets))
        if self.labels:
            parts.append("labels " + ", ".join(str(label) for label in self.labels))
        return ", ".join(parts)


def is_adapter_folder(path) -> bool:
    """Whether ``path`` is a folder holding a saved adapter (peft's ``adapter_config.json``)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(os.path.expanduser(str(path)),
                                                                                ADAPTER_CONFIG))


def read_adapter(path, *, key: str = "model") -> SavedAdapter:
    """Read a saved adapter folder; a one-line error names the key and what is wrong.

    Example::

        read_adapter("runs/stage1").base     # the base the first stage loaded
    """
    folder = os.path.expanduser(str(path))
    try:
        with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as handle:
            peft_config = json.load(handle)
    except OSError:
        raise ConfigError(f"`{key}: {path}` is not a saved adapter (no {ADAPTER_CONFIG}); give the output_dir of an "
                          "earlier LoRA, QLoRA, DoRA, IA3, prompt- or prefix-tuning run") from None
    except ValueError as exc:
        raise ConfigError(f"`{key}: {path}`: {ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    run = _run_info(folder)
    peft_type = str(peft_config.get("peft_type", ""))
    if peft_type not in _PEFT_METHODS:
        raise ConfigError(f"`{key}: {path}` holds a {peft_type or 'unknown'} adapter; ftmagic continues "
                          f"{', '.join(sorted(_PEFT_METHODS))} adapters")
    method = "dora" if peft_type == "LORA" and peft_config.get("use_dora") else _PEFT_METHODS[peft_type]
    if run.get("trained_method") in ("lora", "qlora") and method == "lora":
        method = run["trained_method"]  # peft cannot tell a QLoRA adapter from a LoRA one; the run file can
    head_objective = None
    if peft_config.get("task_type") == "SEQ_CLS":  # its head was saved with it (peft's `modules_to_save`)
        head_objective = run.get("objective") if run.get("objective") in ("reward", "classify") else "classify"
    labels = run.get("labels") if head_objective == "classify" and isinstance(run.get("labels"), list) else None
    return SavedAdapter(path=folder, base=_base_of(folder, peft_config, run, key, path), method=method,
                        settings=_settings(peft_config, method), head_objective=head_objective, labels=labels)


def plan_continuation(cfg) -> tuple:
    """``(config to run, message or None)`` for a run that may continue a saved adapter.

    An adapter is continued when ``cfg.adapter`` is set (``cfg.model`` is then its base,
    unless left at ``tiny``, the default, which means the adapter's own base), or when
    ``cfg.model`` is a folder holding one. The returned config has ``model`` set to the base
    and ``adapter`` to the folder. The adapter's method and settings win over the config's:
    ``method: qlora`` may put a LoRA adapter on a 4-bit base, any other adapter method must
    be the adapter's own (``lora``, the default, follows the adapter), and a method that
    trains the model's own weights (full, freeze, bitfit) needs the adapter merged first.

    Example::

        cfg, message = plan_continuation(FinetuneConfig(model="runs/stage1", data="more.jsonl"))
        cfg.model, cfg.adapter   # ('HuggingFaceTB/SmolLM2-135M', 'runs/stage1')
        message                  # 'continuing the lora adapter of runs/stage1 (r 8, alpha 16, on q_proj, v_proj) on ...'
    """
    source = cfg.adapter if cfg.adapter else (cfg.model if is_adapter_folder(cfg.model) else None)
    if source is None:
        return cfg, None
    key = "adapter" if cfg.adapter else "model"
    saved = read_adapter(source, key=key)
    wanted = get_method_spec(cfg.method)
    if not wanted.adapter:
        raise ConfigError(f"`{key}: {source}` holds a {saved.method} adapter and `method: {cfg.method}` trains the "
                          f"model's own weights; merge the adapter first (`merge: true` writes {source}/merged) and "
                          "point `model:` at the merged folder, or keep training the adapter with an adapter method")
    method = saved.method
    if saved.method in ("lora", "qlora") and cfg.method in ("lora", "qlora"):
        method = "qlora" if cfg.method == "qlora" else saved.method
    elif cfg.method not in (saved.method, "lora"):  # `lora` is the default: it follows the adapter
        raise ConfigError(f"`{key}: {source}` holds a {saved.method} adapter, which cannot continue as "
                          f"`method: {cfg.method}`; set `method: {saved.method}` (or leave `method` out)")
    if saved.head_objective is not None and cfg.objective != saved.head_objective:
        raise ConfigError(f"`{key}: {source}` holds a {saved.method} adapter trained with `objective: "
                          f"{saved.head_objective}` (its head included), which cannot continue as `objective: "
                          f"{cfg.objective}`; set `objective: {saved.head_objective}`, or start a new adapter on its "
                          f"base (`model: {saved.base}`)")
    base = saved.base
    if cfg.adapter and cfg.model != "tiny":
        base = cfg.model  # an explicit base wins (the adapter's may have moved); a mismatch fails to load, in one line
    changes = dict(saved.settings, method=method)
    if saved.labels is not None and cfg.labels is None:
        changes["labels"] = saved.labels  # the head's outputs keep their order; a new label is a one-line error
    settings = saved.describe()
    message = (f"continuing the {method} adapter of {source}" + (f" ({settings})" if settings else "")
               + f" on {base}; its method and settings are kept")
    return cfg.replace(model=base, adapter=str(source), **changes), message


def _run_info(folder: str) -> dict:
    try:
        with open(os.path.join(folder, RUN_FILE), encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _base_of(folder: str, peft_config: dict, run: dict, key: str, path) -> str:
    """The base the adapter was trained on: ftmagic's record first (the path it really loaded), then peft's."""
    recorded = run.get("base_model")
    if run.get("model") == "tiny":
        return "tiny"  # the embedded model: its folder differs between machines
    if isinstance(recorded, str) and recorded and (not os.path.isabs(recorded) or os.path.isdir(recorded)):
        return recorded
    named = peft_config.get("base_model_name_or_path")
    if isinstance(named, str) and named and (not os.path.isabs(named) or os.path.isdir(named)):
        return named
    raise ModelError(f"`{key}: {path}`: cannot tell which base model the adapter was trained on "
                     f"({recorded or named or 'not recorded'} is not available here); set `model:` to the base "
                     f"and `adapter: {path}`")


def _settings(peft_config: dict, method: str) -> dict:
    """The FinetuneConfig fields the saved adapter fixes."""
    spec = get_method_spec(method)
    if spec.prompt_learning:
        return {"num_virtual_tokens": int(peft_config.get("num_virtual_tokens") or 16)}
    targets = peft_config.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    settings = {"target_modules": targets} if targets else {}
    if spec.peft_type == "LORA":
        settings.update(lora_r=int(peft_config.get("r") or 8), lora_alpha=int(peft_config.get("lora_alpha") or 8),
                        lora_dropout=float(peft_config.get("lora_dropout") or 0.0))
    return settings


__all__ = ["SavedAdapter", "is_adapter_folder", "read_adapter", "plan_continuation"]

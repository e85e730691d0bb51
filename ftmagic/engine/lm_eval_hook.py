"""Run lm-evaluation-harness on a tuned model, for users who have its tasks on their machine.

lm-evaluation-harness (``lm_eval``) is the reference runner of public benchmarks; ftmagic
hands it the model already in memory (adapter included, no re-load) and its tokenizer,
and lets it apply the model's chat template so the tuned model is asked the way it was
trained. Tasks come from lm_eval's registry or from ``include_path``, a folder of task
YAML files (its "custom tasks"), which is how data that lives on this machine is used
without a hub.

Example::

    results = run_lm_eval(model, tokenizer, ["my_task"], include_path="tasks/", limit=50)
    results["my_task"]["exact_match,none"]
"""

from __future__ import annotations

from typing import Any, Optional

from ftmagic.errors import ConfigError, did_you_mean

EXTRA_HINT = "pip install 'ftmagic[lm-eval]'"


def run_lm_eval(model, tokenizer, tasks, *, include_path: Optional[str] = None, limit: Optional[int] = None,
                num_fewshot: Optional[int] = None, batch_size: int = 8, chat_template: bool = True,
                **kwargs: Any) -> dict:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on ``model``.

    Unknown task names raise a one-line ConfigError listing where tasks were looked for.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"lm_eval: needs the lm-eval package ({EXTRA_HINT})") from None
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ConfigError("lm_eval: name at least one task, e.g. lm_eval(['my_task'], include_path='tasks/')")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        where = f" or in {include_path}" if include_path else "; pass include_path= for your own task files"
        raise ConfigError(f"lm_eval: unknown task `{missing[0]}` (not in lm_eval's registry{where})"
                          + did_you_mean(missing[0], manager.all_tasks))
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                         num_fewshot=num_fewshot, apply_chat_template=chat_template,
                                         log_samples=False, **kwargs)
    finally:
        model.train(was_training)
    return {task: {k: v for k, v in values.items() if k != "alias"} for task, values in output["results"].items()}

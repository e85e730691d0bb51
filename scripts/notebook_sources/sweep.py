"""notebooks/10_sweep.ipynb: a hyperparameter search on the demo task, judged by generated answers."""

from cells import CHECK, code, md

NAME = "10_sweep"
KIND = "notebooks"

CELLS = [
    md("""
    # Did it get better? Evaluate by generation, then search the hyperparameters

    A falling loss does not say whether the model got better at *your* task. This notebook
    judges runs the way you would: it asks the model held-out questions during training,
    scores the answers (`eval_metrics`), and lets a **sweep** try several learning rates and
    LoRA ranks to find the one that answers best, on the embedded `tiny` model and a CPU.

    The task is the demo's: teach the model to reverse a word, a skill the base model does not
    have. The budget is short on purpose (400 steps per trial instead of the demo's 1,500), so
    the six trials take minutes and the settings matter.
    """),
    code("""
    %load_ext ftmagic
    from ftmagic.demo import DEMO_CONFIG, demo_dataset

    train = demo_dataset("train")   # 2,000 words
    test = demo_dataset("test")     # 100 other words, never trained on
    print(len(train), "training records,", len(test), "held-out records; the demo's defaults:",
          {k: DEMO_CONFIG[k] for k in ("lr", "lora_r", "lora_alpha", "max_steps")})
    """, CHECK),
    md("""
    ## One cell, six runs

    The cell is an ordinary `%%finetune` cell plus a `sweep:` block. Its keys are config keys
    with the values to try (a list, `{choices: [...]}`, or a range such as
    `{log_uniform: [1.0e-4, 1.0e-2]}`), and the search settings: which metric decides,
    in which direction, and how trials are chosen (`grid` here: every combination; `random`
    and `tpe` sample ranges). The grid holds the demo's own settings (`lr: 2.0e-3`,
    `lora_r: 16`), so the default is one of the six trials and the comparison is fair: same
    budget, same seed, same data.

    * `eval_prompts: $test` and `eval_metrics: [exact_match, chrf]`: at step 0 (the base
      model), every `eval_steps` and at the end, the model answers the 100 held-out words
      greedily and the answers are scored. `exact_match` decides; chrF (character n-grams,
      from `sacrebleu`) shows partial progress.
    * `pruner: none`: Optuna's median pruner stops a trial whose curve trails earlier ones,
      which saves time on long runs. Here every curve sits near zero until a late jump, so an
      early judgement would stop good trials; the notebook lets each run to the end.
    * Each trial trains in its own folder, `runs/sweep/trial-NNN`, with its `metrics.json`.
      The search is stored in `runs/sweep/sweep.optuna.log`: running the cell again continues
      it instead of starting over.

    While it runs, a table of trials and a plot of the metric against each parameter fill in;
    when it ends they stay in the notebook, with the best configuration as a ready cell.
    """),
    code("""
    %%finetune --name ft
    model: tiny
    method: lora
    data: $train
    eval_prompts: $test
    eval_metrics: [exact_match, chrf]
    eval_max_new_tokens: 8
    lora_r: 16
    lora_alpha: 32
    lora_dropout: 0.0
    lr: 2.0e-3
    max_steps: 400
    batch_size: 16
    max_seq_len: 128
    warmup: 0.05
    eval_steps: 100
    save_steps: 0
    seed: 0
    output_dir: runs/sweep
    overwrite: true
    sweep:
      lr: [2.0e-3, 5.0e-3, 8.0e-3]
      lora_r: [8, 16]
      metric: exact_match
      pruner: none
    """),
    md("""
    `ft` is now the best trial's run (a `RunResult`, as after any `%%finetune` cell) and
    `ft_sweep` the whole search. Its table, as data:
    """),
    code("""
    import pandas as pd

    pd.DataFrame(ft_sweep.table()).set_index("trial").round(3)
    """),
    md("""
    ## The key figure

    Exact match on the 100 held-out words after 400 steps, the demo's default settings against
    the best trial of the search. When this notebook was built, the default (`lr: 2.0e-3`,
    `lora_r: 16`) reversed 5% of the words exactly and the best trial, `lr: 5.0e-3` with
    `lora_r: 8`, 65%: at this budget the default learning rate is too low to reach the point
    where the skill appears (the best curve below jumps between steps 200 and 300), and
    `8.0e-3` overshoots. Where that jump lands moves with the machine's arithmetic, so CI
    re-runs this notebook and fails if the best trial scores below 50% or below the default.
    """),
    code("""
    default = next(t for t in ft_sweep.trials if t["params"] == {"lr": DEMO_CONFIG["lr"], "lora_r": DEMO_CONFIG["lora_r"]})
    best = ft_sweep.best_value
    print(f"default (lr {DEMO_CONFIG['lr']}, r {DEMO_CONFIG['lora_r']}): exact match {default['value']:.0%}")
    print(f"best    ({', '.join(f'{k} {v}' for k, v in ft_sweep.best_params.items())}): exact match {best:.0%}")
    assert best >= default["value"], (best, default)
    assert best >= 0.50, best   # the floor the text above states
    """),
    md("""
    The curves behind it: each trial's exact match at every evaluation (step 0 is the base
    model, which never reverses a word).
    """),
    code("""
    curves = {f"lr {t['params']['lr']}, r {t['params']['lora_r']}": dict(t["curve"]) for t in ft_sweep.trials}
    pd.DataFrame(curves).T.round(2)
    """),
    md("""
    ## After the search

    The best run answers like any other result, and `evaluate` scores it on any prompts after
    the fact, here against the base model on words it never saw:
    """),
    code("""
    report = ft.evaluate(test, ["exact_match", "chrf"], max_new_tokens=8, base=True)
    print("base model:", {k: round(v, 3) for k, v in report["base_metrics"].items()})
    print("best trial:", {k: round(v, 3) for k, v in report["metrics"].items()})
    pd.DataFrame(report["rows"][:5])
    """),
    md("""
    The same search from a shell is `ftmagic sweep run.yaml` (the cell body as a file), and
    from Python `ftmagic.sweep(config)`. Runs can also be logged to TensorBoard, Weights &
    Biases, MLflow or trackio with `report_to:`; a sweep's trials then sit side by side in
    one project named after its folder.
    """),
]

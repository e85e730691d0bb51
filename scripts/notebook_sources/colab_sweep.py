"""colab/10_sweep.ipynb: evaluate by generation and search learning rate and rank on a T4."""

from cells import code, colab_drive, colab_intro, md

NAME = "10_sweep"
KIND = "colab"
MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"

CELLS = [
    *colab_intro(NAME, "Evaluate by generation and search the hyperparameters on a T4", f"""
    A falling loss does not say whether `{MODEL}` got better at your task. This notebook
    asks it held-out questions during training, scores the answers (`eval_metrics`) and runs
    a small sweep over the learning rate and the LoRA rank with Optuna; each trial is a run
    of its own on Google Drive, and a dropped session continues the search where it stopped.
    """),
    *colab_drive("sweep"),
    code(f"""
    %load_ext ftmagic
    from ftmagic.demo import demo_dataset

    MODEL = "{MODEL}"
    train = demo_dataset("train")
    test = demo_dataset("test")
    """),
    md("""
    ## The search

    A `%%finetune` cell with a `sweep:` block. The memory calculator checks every trial against
    the T4 before it starts and skips the ones that would not fit; the median pruner stops
    trials whose exact-match curve trails the earlier ones. Running the cell again after a
    dropped session continues the search (the Optuna storage is in the sweep's folder).
    """),
    code("""
    %%finetune --name ft --model $MODEL --output-dir {OUT}
    method: lora
    data: $train
    eval_prompts: $test
    eval_metrics: [exact_match, chrf]
    eval_max_new_tokens: 8
    lora_dropout: 0.0
    max_steps: 300
    batch_size: 16
    max_seq_len: 128
    eval_steps: 50
    save_steps: 50
    sweep:
      lr: {log_uniform: [1.0e-4, 3.0e-3]}
      lora_r: [8, 16, 32]
      n_trials: 8
      sampler: tpe
      metric: exact_match
    """),
    md("""
    `ft` is the best trial's run, `ft_sweep` the search (`ft_sweep.table()`, `ft_sweep.study`
    for Optuna's own plots). The best trial against the base model on the held-out words:
    """),
    code("""
    report = ft.evaluate(test, ["exact_match", "chrf"], max_new_tokens=8, base=True)
    print("base:", report["base_metrics"], "| best trial:", report["metrics"])
    print(ft_sweep.best_cell())
    """),
]

"""notebooks/01_quickstart.ipynb: the whole journey on the embedded tiny model, on a CPU."""

from cells import CHECK, RAISES, code, md

from ftmagic.demo import DEMO_CONFIG, DEMO_EXACT_MATCH


def _yaml_value(value):
    return "true" if value is True else "false" if value is False else str(value)


# The training cell is written from DEMO_CONFIG, the demo's one home: `ftmagic demo`, its
# test and this notebook train with the same settings (and the notebook's sync test sees
# any change to them).
_settings = dict(DEMO_CONFIG)
_settings = {"model": _settings.pop("model"), "method": _settings.pop("method"), "data": "$train", **_settings,
             "output_dir": "runs/quickstart", "overwrite": True}
FINETUNE_CELL = "%%finetune --name ft\n" + "\n".join(f"{key}: {_yaml_value(value)}" for key, value in _settings.items())
CLAIM = f"{DEMO_EXACT_MATCH:.0%}"

NAME = "01_quickstart"
KIND = "notebooks"

CELLS = [
    md("""
    # Quickstart: fine-tune a model from a notebook cell

    This notebook walks the whole ftmagic journey on a laptop CPU, with no download:

    1. load the extension,
    2. check that the run fits in memory,
    3. look at the data exactly as the model will see it,
    4. fine-tune with LoRA from a `%%finetune` cell,
    5. compare the model before and after.

    The model is `tiny`, a small pretrained language model that ships inside ftmagic. It
    already follows a chat format and knows a few string skills (uppercase, copy, first
    letter, ...), but it was never taught to **reverse a word**. That is the task we teach it.
    The same cells work for a real model on a GPU: change `model:` (see `colab/01_quickstart.ipynb`).
    """),
    code("""
    %load_ext ftmagic
    """),
    md("""
    Loading the extension imports neither torch nor transformers, so it takes well under a
    second. It registers `%%finetune`, `%%ft_generate`, `%ft_memory` and `%ft_preview`.

    ## 1. Will it fit?

    Before anything loads, the memory calculator predicts the peak memory of one training
    step, split by what holds it. It reads only the model's shape, so it answers in
    milliseconds, for the tiny model here as for a 7B model (see `02_memory_calculator`).
    """),
    code("""
    import ftmagic
    from ftmagic.demo import DEMO_CONFIG, DEMO_EXACT_MATCH, DEMO_PROMPTS, demo_dataset, exact_match

    settings = dict(method="lora", batch_size=DEMO_CONFIG["batch_size"], seq_len=DEMO_CONFIG["max_seq_len"],
                    lora_r=DEMO_CONFIG["lora_r"], precision="fp32")
    estimate = ftmagic.estimate_memory("tiny", **settings)
    print(f"peak {estimate.total_bytes / 2**20:.1f} MiB ({estimate.peak_phase})")
    for part, size in estimate.breakdown.items():
        print(f"  {part:<26} {size / 2**20:7.2f} MiB")
    print(f"trainable parameters: {estimate.trainable_params:,} of {estimate.total_params:,}")
    """, CHECK),
    md("""
    A CPU has memory to spare for this. On a GPU the `%%finetune` cell runs the same check
    first and stops, with suggestions, if the run would not fit.

    ## 2. The data

    `demo_dataset()` returns the task as records in the OpenAI `messages` format: a user
    asks `reverse: <word>`, the assistant answers with the word reversed. The test split
    holds 100 words that never appear in training.
    """),
    code("""
    train = demo_dataset("train")
    test = demo_dataset("test")
    print(len(train), "training records,", len(test), "held-out records")
    train[0]
    """, CHECK),
    md("""
    `%ft_preview` shows what training will really see: the detected format, token lengths
    against `max_seq_len`, problems, and each record rendered through the model's chat
    template with the trained tokens highlighted (in Jupyter it is a widget with a pager).
    """),
    code("""
    %ft_preview train --max-seq-len 128
    """),
    md("""
    The same analysis from Python, as data (`ftmagic.preview` returns a `DatasetReport`):
    """),
    code("""
    summary = ftmagic.preview(train, max_seq_len=128).to_dict()
    print("format:", summary["format"], "| records:", summary["records"], "| skipped:", summary["skipped"],
          "| truncated:", summary["truncated"])
    print("token lengths:", summary["token_lengths"])
    print("problems:", len(summary["problems"]))
    """, CHECK),
    md("""
    Every record is short, nothing is truncated, and only the answer (plus the end-of-turn
    token) is trained: the loss never rewards the model for repeating the question.

    ## 3. Fine-tune

    The cell body is the run's configuration in YAML; `data: $train` trains on the notebook
    variable, with no file to write. While it runs, a widget shows the loss, speed, ETA,
    memory and a **Stop** button; when it ends, a static summary stays in the notebook. The
    result is bound to `ft`.
    """),
    code(FINETUNE_CELL),
    md("""
    A mistake in the cell (an unknown key, a value of the wrong type, bad YAML) stops it
    before anything loads, with one line that names the key and what would be accepted:
    """),
    code("""
    %%finetune --name oops
    model: tiny
    data: $train
    lora_rank: 8
    """, CHECK, RAISES),
    md("""
    ## 4. Before and after

    `%%ft_generate --base` answers each prompt with the base model (the adapter switched off)
    and with the fine-tuned one, side by side. The prompts are words the model never saw in
    training.
    """),
    code("""
    %%ft_generate --base --max-new-tokens 12
    reverse: lamp
    reverse: stone
    reverse: music
    reverse: garden
    reverse: kite
    """),
    md(f"""
    And the number that matters: exact match on the 100 held-out words, before and after.
    `ft.compare` answers every prompt with both models in one pass. The base model gets
    none of them; after training, at least **{CLAIM}** are exactly right (the cell checks
    it, so a run that falls short stops here).
    """),
    code("""
    prompts = [record["messages"][0]["content"] for record in test]
    answers = {row["prompt"]: row for row in ft.compare(prompts, max_new_tokens=12)}
    before = exact_match(lambda prompt: answers[prompt]["base"], test)
    after = exact_match(lambda prompt: answers[prompt]["tuned"], test)
    print(f"exact match on held-out words: {before:.0%} before, {after:.0%} after")
    assert before <= 0.05 and after >= DEMO_EXACT_MATCH, (before, after)  # the figure the text above states
    """),
    md("""
    The adapter is saved in `runs/quickstart` and reloads anywhere with
    `ftmagic.RunResult.load("runs/quickstart")`. `ft.metrics` and `ft.history` hold the
    numbers behind the summary (the history is a list of dicts, easy to turn into a DataFrame).
    """),
    code("""
    print({key: ft.metrics[key] for key in ("steps", "train_loss", "trainable_params", "method", "device")})
    ft.history[-1]
    """),
    md("""
    ## Next

    * `02_memory_calculator`: will a 7B model fit a free Colab T4, and what to change if not.
    * `03_dataset_previewer`: find broken records before a GPU minute is spent.
    * `04_qlora`: 4-bit QLoRA, on this CPU and on a T4.
    * `05_methods_comparison`: full, LoRA, DoRA, IA3, prompt tuning, BitFit and freeze side by side.
    * `06_resume_and_merge`: stop, resume from a checkpoint, merge the adapter.
    """),
]

"""notebooks/08_after_sft.ipynb: preference tuning (DPO) after SFT, a reward model and a classifier, on a CPU."""

from cells import CHECK, code, md

NAME = "08_after_sft"
KIND = "notebooks"

CELLS = [
    md("""
    # After SFT: preference tuning, a reward model and a classifier

    Supervised fine-tuning teaches a model *what* to answer. The stages people run after it
    change *how* it answers (preference tuning: DPO, ORPO), train a reward model that scores
    answers, or turn the model into a classifier. In ftmagic each is one config key,
    `objective:`, in the same `%%finetune` cell, with the same widget, checkpoints, memory
    calculator and previewer.

    Everything here runs on a laptop CPU with the embedded `tiny` model, in about two minutes:

    1. **SFT**: teach `tiny` to answer `describe: <word>`. The training answers end with a
       full stop three times in four (`cpyib is nice.`) and with an exclamation mark once in
       four (`cpyib is nice!`), so the tuned model ends with a full stop;
    2. **DPO**: on pairs that prefer the enthusiastic `!`, move the share of held-out answers
       in that style from 0% to at least 85%;
    3. a **reward model** that scores the two styles;
    4. a **classifier** of short reviews, at least 95% held-out accuracy.
    """),
    code("""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import (preferred_share, sentiment_dataset, style_pairs, style_prompts, style_sft_dataset)

    sft_data = style_sft_dataset()
    pairs = style_pairs()
    print(len(sft_data), "SFT records;", len(pairs), "preference pairs;", len(style_prompts()), "held-out prompts")
    pairs[0]
    """, CHECK),
    md("""
    ## 1. SFT

    The first stage is ordinary supervised fine-tuning (`objective: sft`, the default) with
    LoRA. `merge: true` also writes the adapter folded into the weights, so the next stage
    starts from the tuned model.
    """),
    code("""
    %%finetune --name sft
    model: tiny
    data: $sft_data
    lora_r: 16
    lora_alpha: 32
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 150
    batch_size: 16
    max_seq_len: 64
    eval_steps: 0
    save_steps: 0
    merge: true
    output_dir: runs/after_sft/sft
    overwrite: true
    """),
    md("""
    ## 2. The preference pairs, as the model sees them

    A preference record holds a prompt and two answers, `chosen` and `rejected` (strings, or
    lists of messages, or two full conversations that share their opening turns). The
    previewer shows both sides next to each other: the prompt is context (grey) and only
    the completion tokens, whose log-probabilities DPO compares, are green. Pairs whose two
    sides are the same, or that have an empty side, are flagged and skipped.
    """),
    code("""
    %ft_preview pairs --max-seq-len 64
    """),
    md("""
    ## 3. DPO

    `objective: dpo` trains a new LoRA adapter on the merged SFT model. Its reference (the
    model DPO keeps the policy close to) is that same model with the adapter switched off,
    so no second copy sits in memory. The live widget shows what practitioners watch: the
    reward margin, the chosen and rejected rewards, and the share of pairs the policy
    already ranks correctly (`acc`).

    `beta: 0.5` keeps the policy near the reference; with the common 0.1 this very small
    model over-optimises within a few dozen steps (it pushes the rejected full stop below
    other bytes and its answers break).
    """),
    code("""
    %%finetune --name dpo
    model: runs/after_sft/sft/merged
    objective: dpo
    beta: 0.5
    data: $pairs
    lora_r: 16
    lora_alpha: 32
    lora_dropout: 0.0
    lr: 5.0e-4
    max_steps: 40
    batch_size: 16
    max_seq_len: 64
    eval_steps: 0
    save_steps: 0
    output_dir: runs/after_sft/dpo
    overwrite: true
    """),
    md("""
    The number that matters: the share of answers to **held-out** prompts (words in neither
    stage's data) that end in the preferred style, before DPO (the SFT model: the DPO
    adapter switched off) and after.
    """),
    code("""
    rows = dpo.compare(style_prompts(), max_new_tokens=24)
    before = preferred_share(row["base"] for row in rows)
    after = preferred_share(row["tuned"] for row in rows)
    for row in rows[:4]:
        print(f"{row['prompt']:<18} SFT: {row['base']:<18} DPO: {row['tuned']}")
    print(f"held-out answers in the preferred style: {before:.0%} after SFT, {after:.0%} after DPO")
    assert before <= 0.5 and after >= 0.85, (before, after)
    """),
    md("""
    ## 4. A reward model

    `objective: reward` puts a one-output head on the model and trains it on the same pairs
    with the pairwise (Bradley-Terry) loss. `score()` rates whole conversations; a higher
    score means preferred.
    """),
    code("""
    %%finetune --name rm
    model: runs/after_sft/sft/merged
    objective: reward
    data: $pairs
    lr: 3.0e-3
    max_steps: 30
    batch_size: 16
    max_seq_len: 64
    eval_steps: 0
    save_steps: 0
    output_dir: runs/after_sft/reward
    overwrite: true
    """),
    code("""
    prompt = style_prompts()[0]
    word = prompt.split(": ")[1]
    scores = rm.score([[{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{word} is nice!"}],
                       [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{word} is nice."}]])
    print(f"'{word} is nice!' scores {scores[0]:+.2f}, '{word} is nice.' scores {scores[1]:+.2f}")
    assert scores[0] > scores[1]
    """),
    md("""
    ## 5. A classifier

    `objective: classify` turns the model into a classifier: a head over its pooled output
    (the last token's hidden state for a decoder like `tiny`, the `[CLS]` output for a
    BERT-style encoder). Records hold `text` and `label`; the label set is collected from
    the data and stored with the run. Train the head alone on frozen features with
    `method: freeze` and `trainable_layers: 0`, adapt the model with LoRA (below), or train
    it fully with `method: full`. Evaluation reports accuracy and per-class F1.
    """),
    code("""
    reviews = sentiment_dataset("train")
    held_out = sentiment_dataset("test")
    reviews[:3]
    """, CHECK),
    code("""
    %%finetune --name clf
    model: tiny
    objective: classify
    data: $reviews
    eval_data: $held_out
    lora_r: 16
    lora_alpha: 32
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 120
    batch_size: 16
    max_seq_len: 64
    eval_steps: 0
    save_steps: 0
    output_dir: runs/after_sft/classifier
    overwrite: true
    """),
    code("""
    metrics = clf.metrics["eval_metrics"]
    print({key: round(value, 3) for key, value in metrics.items()})
    print(clf.predict(["what a lovely park!", "the meal was awful."]))
    assert metrics["accuracy"] >= 0.95, metrics
    """),
    md("""
    The runs reload anywhere with `ftmagic.RunResult.load(...)`: `.generate()` for the DPO
    model, `.score()` for the reward model, `.predict()` for the classifier (its labels are
    stored with the run).

    ## Next

    * `colab/08_after_sft`: the same stages on a real model on a Colab T4.
    * `02_memory_calculator`: `objective: dpo` runs two sequences per record and a reference
      forward; the calculator counts both (`ftmagic.estimate_memory(..., objective="dpo")`).
    """),
]

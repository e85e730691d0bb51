"""colab/08_after_sft.ipynb: SFT then DPO, a reward model and a classifier on a Colab T4 with Qwen2.5-0.5B-Instruct."""

from cells import code, colab_drive, colab_intro, md

NAME = "08_after_sft"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

CELLS = [
    *colab_intro(NAME, "After SFT on a Colab GPU: DPO, a reward model and a classifier", f"""
    The stages after supervised fine-tuning on a free Colab T4 with `{MODEL}`: a short SFT
    stage, then DPO on preference pairs (the reference model is the SFT model with the DPO
    adapter switched off: no second copy in GPU memory), a reward model, and a classifier.
    The data ships with ftmagic; only the model is downloaded. About 10 minutes on a T4.
    """),
    *colab_drive("after_sft"),
    md("""
    ## 1. Memory: DPO runs two sequences per record and a reference forward

    The calculator counts both (and, for full fine-tuning, the frozen copy of the weights).
    """),
    code(f"""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import preferred_share, sentiment_dataset, style_pairs, style_prompts, style_sft_dataset

    MODEL = "{MODEL}"
    for objective in ("sft", "dpo", "classify"):
        est = ftmagic.estimate_memory(MODEL, method="lora", objective=objective, batch_size=8, seq_len=128,
                                      bf16_supported=False)
        print(f"{{objective:<9}} predicted peak {{est.total_gib:.2f}} GiB")
    sft_data, pairs = style_sft_dataset(), style_pairs()
    """),
    md("""
    ## 2. SFT, merged for the next stage
    """),
    code(f"""
    %%finetune --name sft --output-dir {{OUT}}/sft
    model: {MODEL}
    data: $sft_data
    lr: 2.0e-4
    max_steps: 100
    batch_size: 16
    max_seq_len: 64
    merge: true
    """),
    md("""
    ## 3. DPO on the merged SFT model
    """),
    code("""
    %ft_preview pairs --model {OUT}/sft/merged --max-seq-len 64
    """),
    code("""
    %%finetune --name dpo --model {OUT}/sft/merged --output-dir {OUT}/dpo
    objective: dpo
    beta: 0.1
    data: $pairs
    lr: 5.0e-5
    max_steps: 60
    batch_size: 8
    max_seq_len: 64
    """),
    code("""
    rows = dpo.compare(style_prompts()[:30], max_new_tokens=24)
    print(f"preferred style: {preferred_share(r['base'] for r in rows):.0%} after SFT, "
          f"{preferred_share(r['tuned'] for r in rows):.0%} after DPO")
    rows[:3]
    """),
    md("""
    ## 4. A reward model and 5. a classifier
    """),
    code(f"""
    %%finetune --name rm --output-dir {{OUT}}/reward
    model: {MODEL}
    objective: reward
    data: $pairs
    lr: 1.0e-4
    max_steps: 40
    batch_size: 8
    max_seq_len: 64
    """),
    code("""
    reviews, held_out = sentiment_dataset("train"), sentiment_dataset("test")
    """),
    code(f"""
    %%finetune --name clf --output-dir {{OUT}}/classifier
    model: {MODEL}
    objective: classify
    data: $reviews
    eval_data: $held_out
    lr: 2.0e-4
    max_steps: 60
    batch_size: 16
    max_seq_len: 64
    """),
    code("""
    print(clf.metrics["eval_metrics"])
    clf.predict(["what a lovely park!", "the meal was awful."])
    """),
]

"""colab/01_quickstart.ipynb: the quickstart on a Colab T4 with SmolLM2-360M-Instruct."""

from cells import code, colab_drive, colab_intro, md

NAME = "01_quickstart"
KIND = "colab"
MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"

CELLS = [
    *colab_intro(NAME, "Quickstart on a Colab GPU: fine-tune SmolLM2 with LoRA", f"""
    The whole ftmagic journey on a free Colab T4: load the extension, check the run fits the
    GPU, look at the data as the model sees it, fine-tune `{MODEL}` with LoRA from a
    `%%finetune` cell, and compare the model before and after. About 5 minutes on a T4.

    The task is one small models are bad at: **reversing a word** (`reverse: lamp` ->
    `pmal`). The data ships with ftmagic, so nothing but the model is downloaded.
    """),
    *colab_drive("quickstart"),
    md("""
    ## 1. Load the extension and check memory

    `%ft_memory` predicts the peak GPU memory of the run before anything loads, with a
    fits / does-not-fit verdict for common GPUs and suggestions when it does not fit.
    """),
    code(f"""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset, exact_match

    MODEL = "{MODEL}"
    estimate = ftmagic.estimate_memory(MODEL, method="lora", batch_size=16, seq_len=128, bf16_supported=False)
    print(f"LoRA on {{MODEL}}: predicted peak {{estimate.total_gib:.2f}} GiB of a T4's 15")
    """),
    code(f"""
    %ft_memory {MODEL} --method lora --batch-size 16 --seq-len 128
    """),
    md("""
    ## 2. The data, as the model sees it

    `%ft_preview` renders every record through the model's own chat template and shows which
    tokens the loss is trained on (only the answer and the end-of-turn token).
    """),
    code(f"""
    train = demo_dataset("train")
    test = demo_dataset("test")
    %ft_preview train --model {MODEL} --max-seq-len 128
    """),
    md("""
    ## 3. Fine-tune

    A live widget shows loss, speed, ETA, GPU memory and a **Stop** button. The checkpoints
    go to Google Drive: if the session drops, reconnect, run the cells above again, then
    this one with `--resume` added to its first line.
    """),
    code(f"""
    %%finetune --name ft --output-dir {{OUT}}
    model: {MODEL}
    method: lora
    data: $train
    lora_r: 16
    lora_alpha: 32
    lr: 1.0e-3
    max_steps: 250
    batch_size: 16
    max_seq_len: 128
    save_steps: 50
    eval_steps: 0
    overwrite: true
    """),
    md("""
    ## 4. Before and after
    """),
    code("""
    %%ft_generate --base --max-new-tokens 12
    reverse: lamp
    reverse: stone
    reverse: music
    reverse: garden
    """),
    code("""
    prompts = [record["messages"][0]["content"] for record in test]
    answers = {row["prompt"]: row for row in ft.compare(prompts, max_new_tokens=12)}
    before = exact_match(lambda prompt: answers[prompt]["base"], test)
    after = exact_match(lambda prompt: answers[prompt]["tuned"], test)
    print(f"exact match on 100 held-out words: {before:.0%} before, {after:.0%} after")
    print(f"measured peak memory {(ft.metrics['peak_memory_bytes'] or 0) / 2**30:.2f} GiB, "
          f"predicted {estimate.total_gib:.2f} GiB")
    """),
    md("""
    The adapter is in `OUT` (on Drive): `ftmagic.RunResult.load(OUT)` reloads it in any
    later session. Next: `colab/04_qlora.ipynb` trains a 1B model in 4-bit.
    """),
]

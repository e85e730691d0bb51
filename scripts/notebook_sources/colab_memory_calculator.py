"""colab/02_memory_calculator.ipynb: plan a run for the GPU you have, then measure it."""

from cells import code, colab_drive, colab_intro, md

NAME = "02_memory_calculator"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"

CELLS = [
    *colab_intro(NAME, "The memory calculator on a Colab GPU", f"""
    Will a run fit this GPU, and what should change if not? This notebook compares every
    method for a 7B model on a T4, opens the interactive calculator, and then checks the
    prediction against a real run of `{MODEL}` on the GPU you have.
    """),
    *colab_drive("memory"),
    code("""
    %load_ext ftmagic
    import ftmagic

    GiB = 2**30
    for method in ["full", "lora", "qlora", "dora", "ia3", "prompt_tuning", "freeze"]:
        est = ftmagic.estimate_memory("mistral-7b", method=method, batch_size=2, seq_len=1024,
                                      gradient_checkpointing=True, bf16_supported=False)
        print(f"{method:<14} trainable {est.trainable_params:>15,}   peak {est.total_gib:6.1f} GiB")
    """),
    md("""
    Only QLoRA fits a 7B model on a 16 GB T4. The widget lets you try the other knobs:
    precision, batch size, sequence length, checkpointing, optimizer, GPU presets.
    """),
    code(f"""
    %ft_memory {MODEL} --method qlora --batch-size 4 --seq-len 1024
    """),
    md(f"""
    ## Prediction against measurement

    Now a real, short QLoRA run of `{MODEL}` on this GPU. The summary shows the measured peak
    (`torch.cuda.max_memory_allocated`) beside the estimate.
    """),
    code(f"""
    from ftmagic.demo import demo_dataset

    train = demo_dataset("train", n=400)
    estimate = ftmagic.estimate_memory("{MODEL}", method="qlora", batch_size=4, seq_len=256,
                                       gradient_checkpointing=True, bf16_supported=False)
    print(f"predicted peak: {{estimate.total_gib:.2f}} GiB")
    """),
    code(f"""
    %%finetune --name ft --output-dir {{OUT}}
    model: {MODEL}
    method: qlora
    data: $train
    batch_size: 4
    max_seq_len: 256
    gradient_checkpointing: true
    max_steps: 30
    save_steps: 0
    eval_steps: 0
    overwrite: true
    """),
    code("""
    measured = ft.metrics["peak_memory_bytes"] or 0
    print(f"predicted {estimate.total_gib:.2f} GiB, measured {measured / 2**30:.2f} GiB on {ft.metrics['device']}")
    """),
    md("""
    On a CPU runtime the measured number is the process's memory, not a GPU's, so the two do
    not compare. `benchmarks/memory_accuracy.py` in the repository runs this comparison over
    a whole matrix of methods and sizes.
    """),
]

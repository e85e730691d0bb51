"""colab/04_qlora.ipynb: QLoRA on Llama 3.2 1B Instruct on a T4, saved to Drive."""

from cells import code, colab_drive, colab_intro, md

NAME = "04_qlora"
KIND = "colab"
MODEL = "meta-llama/Llama-3.2-1B-Instruct"

CELLS = [
    *colab_intro(NAME, "QLoRA on a T4: Llama 3.2 1B in 4-bit", f"""
    QLoRA keeps the frozen base weights in 4-bit NF4 and trains LoRA adapters on top: Llama
    3.2 1B's weights take about 1.5 GiB instead of 2.3 GiB (its large embedding table stays
    16-bit), and a 7B or 8B model fits a free 16 GB T4. On a T4 (no bf16) ftmagic computes in fp16 with a gradient scaler.

    `{MODEL}` is gated: accept its licence on its Hugging Face page and log in
    (`from huggingface_hub import notebook_login; notebook_login()`), or use the ungated
    `Qwen/Qwen2.5-1.5B-Instruct` instead by changing `MODEL` below.
    """),
    *colab_drive("qlora"),
    code(f"""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset, exact_match

    MODEL = "{MODEL}"
    train = demo_dataset("train")
    test = demo_dataset("test", n=50)
    for method in ["lora", "qlora"]:
        est = ftmagic.estimate_memory(MODEL, method=method, batch_size=8, seq_len=128,
                                      gradient_checkpointing=True, bf16_supported=False)
        print(f"{{method:<6}} predicted peak {{est.total_gib:.2f}} GiB")
    """),
    md("""
    The plan line printed by the cell says which device, precision and method really run.
    If the session drops, run the cells above again and this one with `--resume` added to
    its first line: it continues from the newest checkpoint on Drive.
    """),
    code("""
    %%finetune --name ft --model $MODEL --output-dir {OUT}
    method: qlora
    data: $train
    lora_r: 16
    lora_alpha: 32
    lr: 5.0e-4
    max_steps: 200
    batch_size: 8
    max_seq_len: 128
    gradient_checkpointing: true
    save_steps: 50
    eval_steps: 0
    overwrite: true
    """),
    code("""
    %%ft_generate --base --max-new-tokens 12
    reverse: lamp
    reverse: garden
    reverse: kite
    """),
    code("""
    print(f"exact match on 50 held-out words: {exact_match(lambda p: ft.generate(p, max_new_tokens=12), test):.0%}")
    print(f"measured peak {(ft.metrics['peak_memory_bytes'] or 0) / 2**30:.2f} GiB on {ft.metrics['device']}")
    """),
    md("""
    To ship the result as one ordinary 16-bit model, run the cell again with `--resume
    --merge true`: the adapter is folded into a full-precision copy of the base weights in
    `OUT/merged` (see `06_resume_and_merge`).
    """),
]

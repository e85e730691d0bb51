"""notebooks/04_qlora.ipynb: QLoRA on the CPU here, and what the same cell does on a T4."""

from cells import CHECK, code, md

NAME = "04_qlora"
KIND = "notebooks"

CELLS = [
    md("""
    # QLoRA: LoRA on a 4-bit base model

    QLoRA stores the frozen base weights in 4-bit NF4 (with double quantization: about half a
    byte per parameter instead of two) and trains LoRA adapters on top in 16-bit. It is what
    makes a 7B or 8B model trainable on a free 16 GB Colab T4 (see `02_memory_calculator`).

    The 4-bit kernels come from bitsandbytes, which also has a CPU backend, so the very same
    `%%finetune` cell runs here on the CPU. On a GPU nothing changes in the cell.
    """),
    code("""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset

    train = demo_dataset("train", n=800)
    """),
    md("""
    ## What the same cell does on a T4

    Device and precision are chosen by a pure function of the machine's capabilities, so we
    can ask what would happen on a T4 without having one. A T4 (compute capability 7.5) has
    no bf16: ftmagic computes in fp16 with a gradient scaler and keeps the 4-bit weights'
    compute dtype fp16. On an A100 or L4 it would be bf16, with no scaler. Here, on the CPU,
    bitsandbytes' CPU backend computes in fp32.
    """),
    code("""
    from ftmagic.engine.device import DeviceCaps, choose_device

    machines = {
        "Colab T4": DeviceCaps(cuda_available=True, name="Tesla T4", compute_capability=(7, 5),
                               total_memory=15 * 2**30, bf16_supported=False, bnb_available=True),
        "A100": DeviceCaps(cuda_available=True, name="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0),
                           total_memory=40 * 2**30, bf16_supported=True, bnb_available=True),
        "CPU + bitsandbytes": DeviceCaps(bnb_cpu_4bit=True, bnb_available=True),
    }
    for label, caps in machines.items():
        plan = choose_device(caps, method="qlora")
        print(f"{label:<20} device={plan.device:<5} precision={plan.precision:<5} grad_scaler={plan.use_grad_scaler!s:<5} "
              f"4-bit compute={plan.qlora_compute_dtype}")
    """, CHECK),
    md("""
    And the memory it saves, for a model that would be a natural choice on a T4, Llama 3.2 1B
    with 4 sequences of 1024 tokens:
    """),
    code("""
    for method in ["lora", "qlora"]:
        est = ftmagic.estimate_memory("llama-3.2-1b", method=method, batch_size=4, seq_len=1024,
                                      gradient_checkpointing=True, bf16_supported=False)
        print(f"{method:<6} weights {est.breakdown['frozen_weights'] / 2**30:4.2f} GiB   "
              f"peak {est.total_gib:4.2f} GiB")
    """, CHECK),
    md("""
    ## Train with QLoRA here

    The plan line says which method really runs. When 4-bit cannot run on a machine (no
    bitsandbytes, or a model shape its CPU kernel does not support) the engine says so in
    one line and trains plain LoRA instead of failing.
    """),
    code("""
    %%finetune --name ft
    model: tiny
    method: qlora
    data: $train
    lora_r: 16
    lora_alpha: 32
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 60
    batch_size: 16
    max_seq_len: 128
    eval_steps: 0
    save_steps: 0
    output_dir: runs/qlora
    overwrite: true
    """),
    code("""
    q_proj = ft.model.base_model.model.model.layers[0].self_attn.q_proj
    losses = [row["loss"] for row in ft.history if "loss" in row]
    print("method that ran:", ft.metrics["method"])
    print("q_proj:", type(q_proj).__module__, type(q_proj).__name__)
    print("  frozen base layer:", type(q_proj.base_layer).__module__, type(q_proj.base_layer).__name__,
          "| weight stored as", q_proj.base_layer.weight.dtype, tuple(q_proj.base_layer.weight.shape))
    print(f"loss {losses[0]:.2f} at step 1 -> {losses[-1]:.2f} at step {len(losses)}")
    """),
    md("""
    The frozen linear layers are bitsandbytes `Linear4bit` layers now, with LoRA adapters
    around them. 60 steps is a short run: the answers move toward reversals but are not there
    yet (the quickstart's longer LoRA run teaches the task).
    """),
    code("""
    %%ft_generate --base --max-new-tokens 12
    reverse: lamp
    reverse: garden
    reverse: kite
    """),
    md("""
    ## On a real GPU

    `colab/04_qlora.ipynb` runs this journey on a Colab T4 with Llama 3.2 1B Instruct: the
    same cell with `model: meta-llama/Llama-3.2-1B-Instruct`, `gradient_checkpointing: true`
    and `output_dir` on Google Drive. The pre-flight check estimates the run before the
    weights load and stops with suggestions if it would not fit. `merge: true` writes the
    adapter merged into 16-bit base weights (see `06_resume_and_merge`).
    """),
]

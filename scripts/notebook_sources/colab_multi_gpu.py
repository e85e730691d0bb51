"""colab/09_multi_gpu.ipynb: Kaggle's 2xT4 (or any machine with several GPUs) from one notebook cell."""

from cells import code, colab_badge, colab_install, md

NAME = "09_multi_gpu"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

CELLS = [
    colab_badge(NAME),
    md(f"""
    # Two GPUs from one cell: Kaggle's 2xT4

    Kaggle gives two T4s (*Settings > Accelerator > GPU T4 x2*); rented machines have eight.
    `%%finetune --processes 2` trains the same cell on both GPUs through accelerate's
    `notebook_launcher`, as one run: the same steps, batch and learning-rate schedule as on
    one GPU, each GPU doing half of every step. One live widget shows the progress, and its
    **Stop** button stops both processes at the same step.

    The model is `{MODEL}` with LoRA (DDP: each GPU holds the model and averages the
    adapter's gradients). On a single-GPU Colab the multi-process cell says how many GPUs it
    found and the notebook still runs the one-GPU cell.
    """),
    colab_install(),
    md("""
    ### How many GPUs?

    A notebook can start processes for its GPUs only while **no GPU work has run in it yet**:
    the processes are forked from this kernel, and CUDA cannot be shared with a fork. So this
    cell asks the driver through NVML (`PYTORCH_NVML_BASED_CUDA_CHECK`), which leaves CUDA
    untouched, and the multi-GPU cell comes before any one-GPU cell. If GPU cells ran
    already, restart the kernel and run from the top.
    """),
    code("""
    import os

    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # count GPUs without starting CUDA in this kernel
    import torch

    GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if GPUS:
        print(f"{GPUS} GPU(s); the run below uses one process per GPU")
    else:
        print("No GPU in this runtime. In Kaggle: Settings > Accelerator > GPU T4 x2; in Colab: Runtime > "
              "Change runtime type > T4 GPU. (The cells below still run, on two CPU processes, slowly.)")
    PROCESSES = max(2, GPUS)
    """),
    code(f"""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset

    MODEL = "{MODEL}"
    train = demo_dataset("train")
    """),
    md("""
    ## Will it fit each GPU?

    The memory calculator answers per GPU. The micro-batch of 16 is split across the GPUs,
    so each T4 holds 8 rows' activations:
    """),
    code(f"""
    %ft_memory {MODEL} --method lora --batch-size 16 --seq-len 128 --gpu T4 --devices 2 --text
    """),
    md("""
    ## Train on every GPU

    The cell is an ordinary `%%finetune` cell; `--processes` is the only change.
    """),
    code("""
    %%finetune --name two --processes $PROCESSES --model $MODEL --output-dir runs/multi-gpu --overwrite
    method: lora
    data: $train
    lora_r: 16
    lora_dropout: 0.0
    lr: 1.0e-3
    max_steps: 200
    batch_size: 16
    max_seq_len: 128
    eval_steps: 0
    save_steps: 50
    """),
    md("""
    ## The same cell on one GPU

    Without `--processes`, for comparison: the losses match the multi-GPU run's (both runs
    see the same rows in the same order); the multi-GPU run took less time per step.
    """),
    code("""
    %%finetune --name one --model $MODEL --output-dir runs/one-gpu --overwrite
    method: lora
    data: $train
    lora_r: 16
    lora_dropout: 0.0
    lr: 1.0e-3
    max_steps: 200
    batch_size: 16
    max_seq_len: 128
    eval_steps: 0
    save_steps: 50
    """),
    code("""
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(
        [h for h in one.history if h["event"] == "step"], [h for h in two.history if h["event"] == "step"]))
    print(f"largest loss difference between one process and {PROCESSES}: {gap:.1e}")
    print(f"seconds per run: one process {one.metrics['runtime_s']:.1f}, {PROCESSES} processes {two.metrics['runtime_s']:.1f}")
    print(two.generate("reverse: garden", max_new_tokens=12))
    """),
    md("""
    ## From a shell, or on several machines

    The YAML body of a cell is a run file: `ftmagic train run.yaml --processes 2` does from a
    terminal what the cell did, and `ftmagic train run.yaml --processes 16
    --print-accelerate-config launch/` writes the accelerate config for a launch of your own:

    ```bash
    accelerate launch --config_file launch/accelerate_config.yaml --num_machines 2 --num_processes 16 \\
        --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 -m ftmagic.cli train run.yaml
    ```

    `distributed: fsdp` shards the model itself across the GPUs (full fine-tuning picks it by
    itself, with `distributed: auto`), and `deepspeed_zero2` / `deepspeed_zero3` use DeepSpeed
    (`pip install deepspeed`).
    """),
]

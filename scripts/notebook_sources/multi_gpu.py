"""notebooks/09_multi_gpu.ipynb: the same cell on one and two processes (CPU processes here), and how to launch on many GPUs."""

from cells import CHECK, code, md

NAME = "09_multi_gpu"
KIND = "notebooks"

CELLS = [
    md("""
    # One cell, several processes

    A run that outgrows one GPU moves to several, or to several machines, without being
    rewritten: `processes: N` (or `%%finetune --processes N`) trains the same cell on N
    processes through [accelerate](https://huggingface.co/docs/accelerate), with DDP, FSDP or
    DeepSpeed ZeRO (`distributed:`). It stays **the same run**: the same data order, steps,
    effective batch and learning-rate schedule. Each micro-batch of `batch_size` rows is
    split across the processes, so each device does a share of every step.

    This notebook runs on a CPU, where the processes are CPU processes talking over gloo
    (accelerate runs FSDP and DeepSpeed on GPUs only, so they use DDP). It trains one cell on
    one process and on two, and checks that both end with the same losses. Then it shows
    what several GPUs save in memory, and the commands that launch on a cluster.
    """),
    code("""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset

    train = demo_dataset("train", n=480)
    """),
    md("""
    ## One process

    LoRA on the embedded `tiny` model, 24 steps of 16 examples, with 10% held out for
    evaluation. `lora_dropout: 0` keeps the comparison exact (dropout draws different random
    masks when the rows are spread over more processes).
    """),
    code("""
    %%finetune --name one --output-dir runs/one-process --overwrite
    model: tiny
    method: lora
    data: $train
    val_split: 0.1
    lora_r: 8
    lora_alpha: 16
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 24
    batch_size: 16
    max_seq_len: 128
    eval_steps: 8
    save_steps: 0
    seed: 0
    """),
    md("""
    ## Two processes: the same cell, one flag

    `--processes 2` starts two processes with `accelerate.notebook_launcher`, the way Kaggle's
    2xT4 notebooks do. The first process sends its progress back to this notebook, so there
    is still one live widget, and its **Stop** button stops both processes at the same step
    (each saves the same checkpoint). If one process fails, both end and the cell shows one
    line naming the process and its error.
    """),
    code("""
    %%finetune --name two --processes 2 --output-dir runs/two-processes --overwrite
    model: tiny
    method: lora
    data: $train
    val_split: 0.1
    lora_r: 8
    lora_alpha: 16
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 24
    batch_size: 16
    max_seq_len: 128
    eval_steps: 8
    save_steps: 0
    seed: 0
    """),
    md("""
    Each process ran 8 of every 16 rows. Gradients are averaged across the processes, each
    weighted by its share of the step's trained tokens, and the logged and evaluation losses
    are summed over both, so the run is the one-process run, to float rounding:
    """),
    code("""
    def losses(result, kind, field):
        return {row["step"]: row[field] for row in result.history if row["event"] == kind}

    train_gap = max(abs(a - b) for a, b in zip(losses(one, "step", "loss").values(), losses(two, "step", "loss").values()))
    eval_gap = max(abs(a - b) for a, b in zip(losses(one, "eval", "eval_loss").values(),
                                              losses(two, "eval", "eval_loss").values()))
    print(f"{'step':>4} {'1 process':>10} {'2 processes':>12}")
    for step in (1, 8, 16, 24):
        print(f"{step:>4} {losses(one, 'step', 'loss')[step]:>10.4f} {losses(two, 'step', 'loss')[step]:>12.4f}")
    print("largest difference: train loss below 1e-4:", train_gap < 1e-4, "| eval loss below 1e-4:", eval_gap < 1e-4)
    print("processes:", one.metrics.get("processes", 1), "and", two.metrics["processes"], "| strategy:", two.metrics["distributed"])
    assert train_gap < 1e-4 and eval_gap < 1e-4
    """, CHECK),
    md("""
    ## What several GPUs save

    The memory calculator answers per device. Full fine-tuning of Llama 3.1 8B does not fit
    one A100 40GB; its first suggestion is two of them with FSDP, which shards weights,
    gradients and optimizer states (DDP would replicate them all, plus its gradient buckets):
    """),
    code("""
    %ft_memory llama-3.1-8b --method full --batch-size 8 --seq-len 1024 --gradient-checkpointing --gpu "A100 40GB" --text
    """, CHECK),
    code("""
    for strategy in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        est = ftmagic.estimate_memory("llama-3.1-8b", method="full", batch_size=8, seq_len=1024,
                                      gradient_checkpointing=True, devices=2, strategy=strategy)
        print(f"2 GPUs, {strategy:<16} {est.total_gib:6.1f} GiB per GPU")
    """, CHECK),
    md("""
    ## On a GPU machine, or several

    From a shell, the YAML of a cell is a run file. `ftmagic train run.yaml --processes 8`
    starts eight processes itself through accelerate's launcher, and the same command runs
    unchanged under `accelerate launch` or `torchrun`, where only the first process prints.
    `--print-accelerate-config DIR` writes the accelerate config (and, for DeepSpeed, its JSON)
    that `--processes` uses, for launching yourself:
    """),
    code("""
    %%writefile runs/run.yaml
    model: meta-llama/Llama-3.1-8B
    method: full
    data: train.jsonl
    batch_size: 16
    gradient_checkpointing: true
    processes: 16
    output_dir: /shared/runs/llama-full
    """),
    code("""
    !ftmagic train runs/run.yaml --print-accelerate-config runs/launch
    """, CHECK),
    md("""
    Two machines with eight GPUs each, the run file and `output_dir` on a shared filesystem
    (checkpoints are written by the first process and read by all on resume). On each
    machine, with its own `--machine_rank`:

    ```bash
    accelerate launch --config_file runs/launch/accelerate_config.yaml \\
        --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 \\
        -m ftmagic.cli train runs/run.yaml          # --machine_rank 1 on the second machine
    ```

    or with torchrun (`--nproc_per_node` counts one machine's processes):

    ```bash
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 \\
        --master_addr 10.0.0.1 --master_port 29500 \\
        -m ftmagic.cli train runs/run.yaml          # --node_rank 1 on the second machine
    ```

    A checkpoint resumes on a different number of processes with DDP and FSDP (they are
    written whole); DeepSpeed's own partitioned state resumes on the same count.
    """),
]

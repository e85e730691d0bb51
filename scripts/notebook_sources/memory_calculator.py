"""notebooks/02_memory_calculator.ipynb: will a run fit, and what to change if not."""

from cells import CHECK, code, md

NAME = "02_memory_calculator"
KIND = "notebooks"

CELLS = [
    md("""
    # The memory calculator: will this run fit, and what to change if not

    Running out of GPU memory is the error people hit most when fine-tuning. ftmagic predicts
    the peak memory of one training step **before** anything is loaded, split by what holds
    it: frozen and trainable weights (4-bit NF4 for QLoRA), gradients, optimizer states,
    saved activations, the logits (batch x sequence x vocabulary: this term alone sinks
    large-vocabulary models) and the optimizer step's transient copy. The peak is the
    largest of three moments (end of forward, backward, optimizer step), not the sum of
    everything.

    It only needs the model's shape: a built-in table of popular models, a local folder's
    `config.json`, or a config dict. Nothing is downloaded, torch is not imported.
    """),
    code("""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.memory import builtin_names

    print(", ".join(builtin_names()))
    """, CHECK),
    md("""
    ## A 7B model on a free Colab T4

    A T4 has 16 GB (about 14.7 GiB visible to torch, part of it taken by the CUDA context)
    and no bf16, so training runs in fp16. `check_fit` gives the verdict for a GPU preset:
    the predicted peak plus the CUDA context and allocator headroom must fit. Here is every
    method for Mistral 7B with 2 sequences of 1024 tokens per step and gradient
    checkpointing on (BitFit is left out: Mistral's linears have no biases to train, and the
    calculator refuses it just as a run would):
    """),
    code("""
    from ftmagic.memory import check_fit

    GiB = 2**30
    methods = ["full", "lora", "qlora", "dora", "ia3", "prompt_tuning", "freeze"]
    run = dict(batch_size=2, seq_len=1024, gradient_checkpointing=True)

    print("{:<14}{:>15}{:>9}{:>13}{:>12}{:>8}{:>10}{:>9}".format(
        "method", "trainable", "weights", "grads+optim", "act+logits", "peak", "required", "fits T4"))
    for method in methods:
        verdict = check_fit("mistral-7b", "T4", method=method, **run)
        est, b = verdict.estimate, verdict.estimate.breakdown
        weights = b["frozen_weights"] + b["trainable_weights"]
        training = b["gradients"] + b["optimizer_states"] + b["optimizer_step_transient"]
        print("{:<14}{:>15,}{:>9.1f}{:>13.1f}{:>12.1f}{:>8.1f}{:>10.1f}{:>9}".format(
            method, est.trainable_params, weights / GiB, training / GiB, (b["activations"] + b["logits"]) / GiB,
            est.total_gib, verdict.required_bytes / GiB, "yes" if verdict.fits else "no"))
    print("(GiB, at the peak phase of one step)")
    """, CHECK),
    md("""
    Only QLoRA fits: its frozen weights are NF4, about half a byte per parameter, while every
    method that keeps 16-bit weights spends 13.5 GiB on them alone. Full fine-tuning keeps
    fp32 master weights, gradients and two AdamW states: 16 bytes per parameter before a
    single activation.

    When a run does not fit, the verdict comes with ranked suggestions, each with its own
    new estimate: the cheapest change that makes it fit comes first.
    """),
    code("""
    verdict = check_fit("mistral-7b", "T4", method="lora", **run)
    print(verdict.message)
    for suggestion in verdict.suggestions:
        print(" -", suggestion, "fits" if suggestion.fits else "does not fit")
    """, CHECK),
    code("""
    def required(**changes):
        settings = dict(method="lora", batch_size=2, seq_len=1024)
        settings.update(changes)
        return check_fit("mistral-7b", "T4", **settings).required_bytes / GiB

    for label, changes in [
        ("LoRA, no checkpointing", {}),
        ("LoRA + gradient checkpointing", dict(gradient_checkpointing=True)),
        ("QLoRA, no checkpointing", dict(method="qlora")),
        ("QLoRA + checkpointing", dict(method="qlora", gradient_checkpointing=True)),
        ("QLoRA + checkpointing, batch 8", dict(method="qlora", gradient_checkpointing=True, batch_size=8)),
        ("QLoRA + checkpointing, 4096 tokens", dict(method="qlora", gradient_checkpointing=True, seq_len=4096)),
    ]:
        print(f"{label:<36} needs {required(**changes):5.1f} GiB")
    """, CHECK),
    md("""
    ## The interactive calculator

    `%ft_memory` opens the same calculator as a widget: model, method, precision, batch
    size, sequence length, checkpointing and optimizer controls, GPU presets (T4, L4, A10G,
    RTX 3090/4090, A100, H100) with a fits / does-not-fit verdict, a stacked bar of the
    breakdown, and ranked suggestions. Each change recomputes in milliseconds.
    """),
    code("""
    %ft_memory mistral-7b --method lora --batch-size 2 --seq-len 1024 --gradient-checkpointing --gpu T4
    """),
    md("""
    ## Any model: a local folder or a config dict

    A local folder with a `config.json` works as well as a built-in name (a Hugging Face id
    works when its config is in the local cache). Here, the embedded `tiny` model:
    """),
    code("""
    est = ftmagic.estimate_memory("tiny", method="full", batch_size=8, seq_len=128, precision="fp32")
    print(f"tiny, full fine-tuning: {est.total_params:,} parameters, peak {est.total_bytes / 2**20:.1f} MiB "
          f"at the {est.peak_phase}")
    """, CHECK),
    md("""
    Mistakes give one line that says what is accepted; a near-miss name gets a suggestion:
    """),
    code("""
    for mistake in [dict(model="mistral-7"), dict(model="mistral-7b", method="qlora", precision="fp32"),
                    dict(model="mistral-7b", batch_size=0)]:
        try:
            ftmagic.estimate_memory(**mistake)
        except ftmagic.FtmagicError as error:
            print(f"{type(error).__name__}: {error}")
    """, CHECK),
    md("""
    ## Exact mode: trace one real training step

    The analytic estimate is a formula. **Exact mode** runs one real training step of the
    actual model under torch's `FakeTensorMode` with its memory tracker: every tensor has a
    shape and a dtype but no storage, so any architecture's peak is measured on a laptop CPU
    without allocating it. It takes seconds to a minute instead of milliseconds; we use the
    small `tiny` model so this notebook stays quick. QLoRA is traced with a stand-in for the
    4-bit layers (same saved activations, weights counted at their NF4 size); what cannot
    run on fake tensors at all (bitsandbytes' 8-bit optimizers) falls back to the analytic
    estimate with a note saying so.
    """),
    code("""
    for method in ["full", "lora"]:
        kwargs = dict(method=method, batch_size=8, seq_len=128, precision="fp32")
        analytic = ftmagic.estimate_memory("tiny", **kwargs)
        exact = ftmagic.estimate_memory("tiny", mode="exact", **kwargs)
        print(f"{method:<5} analytic {analytic.total_bytes / 2**20:6.2f} MiB   exact {exact.total_bytes / 2**20:6.2f} MiB")
    """),
    md("""
    `benchmarks/memory_accuracy.py` compares the analytic estimate, exact mode and the
    measured peak over a matrix of methods, sizes, batches, lengths and checkpointing.

    In a `%%finetune` cell on a GPU, the same estimate runs as a pre-flight check before
    the weights load; after training the summary shows the measured peak beside it.
    """),
]

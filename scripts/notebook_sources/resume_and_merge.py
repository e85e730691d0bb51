"""notebooks/06_resume_and_merge.ipynb: stop a run, resume it exactly, merge and reload."""

from cells import CHECK, code, md

NAME = "06_resume_and_merge"
KIND = "notebooks"

CELLS = [
    md("""
    # Stop, resume, merge

    Runs get cut short: you press **Stop**, interrupt the kernel, or a Colab session drops.
    ftmagic checkpoints atomically (a half-written checkpoint is never taken for a good one),
    and a checkpoint holds everything the run needs to continue exactly: weights or adapter,
    optimizer and scheduler state, random number generators and the position in the data.
    A resumed run ends with the same loss as one that never stopped.

    This notebook stops a run half-way, resumes it with `%%finetune --resume`, checks it
    against an uninterrupted run, then merges the LoRA adapter into the base weights and
    loads the merged model with plain transformers.
    """),
    code("""
    %load_ext ftmagic
    import threading

    import ftmagic
    from ftmagic.demo import demo_dataset

    train = demo_dataset("train", n=640)
    config = dict(model="tiny", method="lora", data=train, lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=3e-3,
                  max_steps=40, batch_size=16, max_seq_len=128, eval_steps=0, save_steps=10, seed=0)
    """),
    md("""
    ## A run that stops half-way

    The widget's **Stop** button sets an event that the engine checks after every step: the
    run ends after the current step and saves a checkpoint. From Python the same event is
    the `stop` argument; here a callback presses "Stop" at step 25 (kernel interrupts and
    `KeyboardInterrupt` end a run the same way).
    """),
    code("""
    stop = threading.Event()

    def press_stop_at_step_25(event):
        if event.kind == "step" and event.step == 25:
            stop.set()

    first = ftmagic.finetune(config, output_dir="runs/resume", overwrite=True, stop=stop, on_event=press_stop_at_step_25)
    print("stopped:", first.metrics["stopped"], "| reason:", first.metrics["reason"], "| steps:", first.metrics["steps"])
    """, CHECK),
    code("""
    import os

    print(sorted(os.listdir("runs/resume/checkpoints")))
    """, CHECK),
    md("""
    The newest checkpoint is step 25 (checkpoints every `save_steps: 10`, plus one where the
    run stopped; `save_total_limit` keeps the two newest).

    ## Resume

    After a kernel restart or in a new Colab session, run the same cell with `--resume`
    (or `resume: true` in the body): it finds the newest good checkpoint in `output_dir`
    and continues from there. A different configuration in the same `output_dir` is refused
    rather than mixed in.
    """),
    code("""
    %%finetune --resume --name ft
    model: tiny
    method: lora
    data: $train
    lora_r: 8
    lora_alpha: 16
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 40
    batch_size: 16
    max_seq_len: 128
    eval_steps: 0
    save_steps: 10
    seed: 0
    output_dir: runs/resume
    merge: true
    """),
    md("""
    Is it really the same run? Train the same configuration without stopping and compare the
    loss of every step after the resume point:
    """),
    code("""
    reference = ftmagic.finetune(config, output_dir="runs/resume-reference", overwrite=True)

    def step_losses(result):
        return {row["step"]: row["loss"] for row in result.history if "loss" in row}

    resumed, uninterrupted = step_losses(ft), step_losses(reference)
    gap = max(abs(resumed[step] - uninterrupted[step]) for step in range(26, 41))
    print(f"steps 26-40: largest loss difference between resumed and uninterrupted run = {gap:.1e}")
    assert gap < 1e-4, gap
    """),
    md("""
    ## Merge and reload

    `merge: true` in the resumed run also wrote the adapter folded into a copy of the base
    weights (`output_dir/merged`). That folder is an ordinary transformers checkpoint: it
    loads without ftmagic or peft, serves with any inference stack, and can itself be
    the `model:` of a new run.
    """),
    code("""
    print(sorted(os.listdir("runs/resume/merged")))
    """),
    code("""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Loading weights" bar in the saved notebook
    tokenizer = AutoTokenizer.from_pretrained("runs/resume/merged")
    merged = AutoModelForCausalLM.from_pretrained("runs/resume/merged")

    def answer(prompt):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = merged.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    for prompt in ["reverse: lamp", "reverse: stone", "reverse: music"]:
        print(f"{prompt:<16} merged: {answer(prompt):<8} adapter: {ft.generate(prompt, max_new_tokens=12)}")
        assert answer(prompt) == ft.generate(prompt, max_new_tokens=12)
    """),
    md("""
    The merged model answers exactly like base + adapter. The adapter folder itself
    (`runs/resume`) stays small and reloads with `ftmagic.RunResult.load`:
    """),
    code("""
    again = ftmagic.RunResult.load("runs/resume")
    print(again)
    print(again.generate("reverse: garden", max_new_tokens=12))
    """),
]

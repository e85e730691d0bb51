"""colab/06_resume_and_merge.ipynb: survive a dropped session with Drive, then merge."""

from cells import code, colab_drive, colab_intro, md

NAME = "06_resume_and_merge"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

CELLS = [
    *colab_intro(NAME, "Resume after a dropped Colab session, then merge", f"""
    Colab sessions drop. With `output_dir` on Google Drive, a run that was cut off continues
    from its newest checkpoint in a new session with `--resume`, and ends with the same loss
    as if it had never stopped. Then `merge: true` writes the LoRA adapter folded into the
    weights of `{MODEL}`, an ordinary checkpoint any tool loads.
    """),
    *colab_drive("resume"),
    code(f"""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset

    MODEL = "{MODEL}"
    train = demo_dataset("train")
    """),
    md("""
    ## Train, and stop

    Press the widget's **Stop** button (or *Runtime > Interrupt execution*) while this runs:
    the run ends after the current step and saves a checkpoint on Drive. If you let it
    finish, nothing is lost either: the next cell then has nothing left to do but merge.
    """),
    code("""
    %%finetune --name ft --model $MODEL --output-dir {OUT}
    method: lora
    data: $train
    lora_r: 16
    lr: 1.0e-3
    max_steps: 300
    batch_size: 16
    max_seq_len: 128
    save_steps: 25
    eval_steps: 0
    """),
    md("""
    ## Resume (in this session or a new one)

    In a new session: run the set-up cells (install, Drive, imports), skip the cell above,
    and run this one. `--resume` finds the newest good checkpoint on Drive; `merge: true`
    writes `OUT/merged` when the run ends.
    """),
    code("""
    %%finetune --resume --name ft --model $MODEL --output-dir {OUT}
    method: lora
    data: $train
    lora_r: 16
    lr: 1.0e-3
    max_steps: 300
    batch_size: 16
    max_seq_len: 128
    save_steps: 25
    eval_steps: 0
    merge: true
    """),
    md("""
    ## Reload the merged model

    `OUT/merged` is a plain transformers checkpoint: no ftmagic or peft needed to use it.
    """),
    code("""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = os.path.join(OUT, "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="auto").to("cuda" if torch.cuda.is_available() else "cpu")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "reverse: garden"}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    print("merged:", tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print("adapter:", ft.generate("reverse: garden", max_new_tokens=12))
    """),
]

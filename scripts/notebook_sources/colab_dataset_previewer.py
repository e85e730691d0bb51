"""colab/03_dataset_previewer.ipynb: preview your own data with a real model's tokenizer."""

from cells import code, colab_intro, md

NAME = "03_dataset_previewer"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

CELLS = [
    *colab_intro(NAME, "The dataset previewer with a real tokenizer", f"""
    See exactly what `{MODEL}` would be trained on: format detection, token lengths with its
    tokenizer and chat template, loss masks, and every problem with its line number. Only
    the tokenizer is downloaded (a few MB); no GPU is needed for this one.
    """),
    code("""
    %load_ext ftmagic
    import json
    import os

    import ftmagic

    def chat(user, assistant):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    os.makedirs("runs/data", exist_ok=True)
    lines = [
        json.dumps(chat("What is the capital of France?", "Paris.")),
        json.dumps(chat("What is 2 + 2?", "4")),
        '{"messages": [{"role": "user", "content": "unfinished line"',
        json.dumps(chat("Name a primary colour.", "")),
        json.dumps({"messages": [{"role": "user", "content": "Hello?"}]}),
        json.dumps(chat("What is 2 + 2?", "4")),
        json.dumps(chat("what is 2 +  2?", "4")),
        json.dumps(chat("Tell me a long story.", "Once upon a time " * 60)),
    ]
    with open("runs/data/mine.jsonl", "w") as f:
        f.write("\\n".join(lines) + "\\n")
    print(len(lines), "lines written to runs/data/mine.jsonl")
    """),
    md("""
    Replace `runs/data/mine.jsonl` with your own file (upload it in the Files pane, or read
    it from Drive): a JSONL/CSV/Parquet file, a Hugging Face dataset id, or a DataFrame or
    list of dicts in a variable.
    """),
    code(f"""
    %ft_preview runs/data/mine.jsonl --model {MODEL} --max-seq-len 64
    """),
    code(f"""
    report = ftmagic.preview("runs/data/mine.jsonl", model="{MODEL}", max_seq_len=64)
    for problem in report.to_dict()["problems"]:
        print(f"{{problem['kind']:<18}} {{problem['location']:<24}} {{problem['message']}}")
    """),
    md("""
    `ftmagic.clean` writes a copy without the unreadable lines, empty fields and duplicates,
    and says what it dropped; the original is never touched, and an existing file is replaced
    only with `overwrite=True` (here: this notebook's own copy, when the cell runs again).
    """),
    code("""
    cleaned = ftmagic.clean("runs/data/mine.jsonl", "runs/data/mine.clean.jsonl", overwrite=True)
    print(cleaned.summary())
    """),
]

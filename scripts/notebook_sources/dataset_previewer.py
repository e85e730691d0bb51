"""notebooks/03_dataset_previewer.ipynb: see exactly what the model will be trained on."""

from cells import CHECK, code, md

NAME = "03_dataset_previewer"
KIND = "notebooks"

CELLS = [
    md("""
    # The dataset previewer: see exactly what the model will be trained on

    Most failed fine-tunes fail on data: the wrong format detected, a template that drops the
    system prompt, the loss on the prompt instead of the answer, answers without an
    end-of-sequence token, half the records truncated, duplicates. The previewer shows all of
    it before a GPU minute is spent, and it runs **the same code** training runs, so what
    you see is what the model gets.

    This notebook writes two small files itself: a clean one and one with a problem on
    almost every line.
    """),
    code("""
    %load_ext ftmagic
    import json
    import os

    import ftmagic

    os.makedirs("runs/data", exist_ok=True)
    clean_records = [
        {"instruction": "Uppercase this word.", "input": word, "output": word.upper()}
        for word in ["apple", "river", "stone", "cloud", "green", "table", "house", "light"]
    ]
    with open("runs/data/clean.jsonl", "w") as f:
        for record in clean_records:
            f.write(json.dumps(record) + "\\n")
    print(open("runs/data/clean.jsonl").readline())
    """, CHECK),
    md("""
    ## A clean file

    `ftmagic.preview` (or `%ft_preview` for the widget) detects the format and says why,
    counts the records, measures token lengths against `max_seq_len` with the model's
    tokenizer (here the embedded `tiny` model's; pass `model=` for yours), and lists problems.
    """),
    code("""
    report = ftmagic.preview("runs/data/clean.jsonl", model="tiny", max_seq_len=64)
    print(report.to_text())
    """, CHECK),
    md("""
    Each record can be opened exactly as training sees it: the raw record, the text the
    template renders, and every token with whether the loss is trained on it. Only the
    answer and the closing `<|im_end|>` are trained; the prompt is context.
    """),
    code("""
    view = report.record(0)
    print(view.text)
    print("trained tokens:", "".join(token.text for token in view.tokens if token.trained))
    """, CHECK),
    md("""
    In Jupyter, `%ft_preview` shows the same report as a widget with a token-length
    histogram, the problem list and a record pager with the tokens coloured by the loss mask:
    """),
    code("""
    %ft_preview runs/data/clean.jsonl --max-seq-len 64
    """),
    md("""
    ## A broken file

    Now a chat dataset (OpenAI `messages` format) with the problems real datasets have: a
    line that is not JSON, invalid UTF-8 bytes, an empty answer, a conversation that does not
    end with the assistant, roles out of order, an exact and a near duplicate (same text up
    to case and spaces), and a record far longer than `max_seq_len`.
    """),
    code("""
    def chat(user, assistant):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}

    lines = [
        json.dumps(chat("What is the capital of France?", "Paris.")),
        json.dumps(chat("What is 2 + 2?", "4")),
        '{"messages": [{"role": "user", "content": "unfinished line"',                     # not JSON
        json.dumps(chat("Name a primary colour.", "")),                                     # empty answer
        json.dumps({"messages": [{"role": "user", "content": "Hello?"}]}),                # no assistant turn
        json.dumps({"messages": [{"role": "assistant", "content": "Hi"},
                                 {"role": "user", "content": "Hello"}]}),                  # roles out of order
        json.dumps(chat("What is 2 + 2?", "4")),                                            # exact duplicate
        json.dumps(chat("what is 2 +  2?", "4")),                                           # near duplicate
        json.dumps(chat("Tell me a long story.", "Once upon a time " * 40)),               # too long
        json.dumps(chat("Translate 'cat' to French.", "chat")),
    ]
    with open("runs/data/broken.jsonl", "wb") as f:
        for line in lines:
            f.write(line.encode() + b"\\n")
        f.write(b'{"messages": [{"role": "user", "content": "caf\\xe9"}, {"role": "assistant", "content": "ok"}]}\\n')
    print(len(lines) + 1, "lines written")
    """, CHECK),
    code("""
    broken = ftmagic.preview("runs/data/broken.jsonl", model="tiny", max_seq_len=64)
    print(broken.to_text())
    """, CHECK),
    md("""
    Every problem names its place (`file:line`), so it can be fixed at the source. The same
    report is available as data, e.g. to fail a pipeline when a dataset gets worse:
    """),
    code("""
    data = broken.to_dict()
    print({key: data[key] for key in ("format", "records", "skipped", "truncated")})
    for problem in data["problems"]:
        print(f"{problem['kind']:<18} {problem['location']:<26} {problem['message']}")
    """, CHECK),
    md("""
    ## Fixing it: `ftmagic.clean`

    `ftmagic.clean` never touches the original: it writes a cleaned copy without unreadable
    lines, empty or missing fields and duplicates (the first one is kept), and reports what
    it dropped. Problems that need a human (a conversation without an answer, a too-long
    record) are left for you to decide. An existing file is never replaced unless you pass
    `overwrite=True`, as this notebook does for its own copy when it runs again.
    """),
    code("""
    cleaned = ftmagic.clean("runs/data/broken.jsonl", "runs/data/broken.clean.jsonl", overwrite=True)
    print(cleaned.summary())
    for problem in cleaned.dropped:
        print(" ", problem.kind, problem.location)
    """, CHECK),
    code("""
    after = ftmagic.preview("runs/data/broken.clean.jsonl", model="tiny", max_seq_len=64)
    print(after.to_text())
    """, CHECK),
    md("""
    The same previewer runs from a shell: `ftmagic preview runs/data/broken.jsonl --model tiny`
    prints this report, `--json` prints it as one JSON object, and `--write-clean PATH` writes
    the cleaned copy.
    """),
]

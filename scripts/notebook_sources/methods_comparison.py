"""notebooks/05_methods_comparison.ipynb: seven fine-tuning methods on the same task."""

from cells import CHECK, code, md

NAME = "05_methods_comparison"
KIND = "notebooks"

CELLS = [
    md("""
    # Seven ways to fine-tune, on the same task

    ftmagic trains with full fine-tuning and six parameter-efficient methods. They differ in
    what trains, and so in memory, speed and how much they can learn:

    | method | what trains |
    |---|---|
    | `full` | every weight |
    | `lora` | low-rank adapters beside every linear layer |
    | `dora` | LoRA with a separate magnitude per output (weight-decomposed) |
    | `ia3` | learned rescaling vectors on keys, values and the MLP |
    | `prompt_tuning` | a few virtual tokens prepended to every input |
    | `bitfit` | bias terms only (the model needs biases) |
    | `freeze` | the top blocks and the output head, the rest frozen |

    Each one here teaches the embedded `tiny` model to reverse words with the same data and
    the same number of steps, each with a learning rate suited to it. The runs are kept short
    so the notebook executes in about a minute on a laptop CPU: the numbers show the
    trade-offs, not the best each method can do.
    """),
    code("""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset

    train = demo_dataset("train", n=960)
    test = demo_dataset("test", n=30)
    STEPS = 60  # one pass over `train` at batch 16

    # A learning rate per method: vectors and virtual tokens need larger steps than adapters.
    LR = {"full": 1e-3, "lora": 3e-3, "dora": 3e-3, "ia3": 3e-2, "prompt_tuning": 3e-2, "bitfit": 1e-2, "freeze": 1e-3}
    common = dict(model="tiny", data=train, eval_data=test, max_steps=STEPS, batch_size=16, max_seq_len=128,
                  lora_r=16, lora_alpha=32, lora_dropout=0.0, num_virtual_tokens=8, trainable_layers=1,
                  warmup=0.05, eval_steps=0, save_steps=0, overwrite=True, seed=0)


    def letter_accuracy(generate, records):
        \"\"\"Share of answer letters in the right place: partial credit that moves long before exact match does.\"\"\"
        scores = []
        for record in records:
            prompt, answer = record["messages"][0]["content"], record["messages"][1]["content"]
            got = generate(prompt).strip()
            scores.append(sum(a == b for a, b in zip(got, answer)) / max(len(answer), len(got)))
        return sum(scores) / len(scores)
    """),
    md("""
    `ftmagic.finetune` is the Python spelling of `%%finetune`: same configuration keys, same
    engine, a `RunResult` back. Without an `on_event` callback it trains quietly. A method
    that cannot apply to the model stops with a one-line `FtmagicError` before training.
    """),
    code("""
    results, skipped = {}, {}
    for method, lr in LR.items():
        try:
            ft = ftmagic.finetune(method=method, lr=lr, output_dir=f"runs/methods/{method}", **common)
        except ftmagic.FtmagicError as error:
            skipped[method] = str(error)
            print(f"{method:<14} not run: {error}")
            continue
        estimate = ftmagic.estimate_memory("tiny", method=method, batch_size=16, seq_len=128, precision="fp32",
                                           lora_r=16, num_virtual_tokens=8, trainable_layers=1, lora_dropout=0.0)
        generate = lambda prompt: ft.generate(prompt, max_new_tokens=12)
        results[method] = dict(
            letters=letter_accuracy(generate, test),
            eval_loss=ft.metrics["eval_loss"],
            trainable=ft.metrics["trainable_params"],
            seconds=ft.metrics["runtime_s"],
            memory_mib=estimate.total_bytes / 2**20,
        )
        print(f"{method:<14} trained: held-out loss {ft.metrics['eval_loss']:.3f}")
    """),
    md("""
    BitFit trains bias terms, and the tiny model, like every Llama-style model, has none:
    ftmagic says so instead of training nothing. On a model with biases (Qwen2.5 has them in
    its attention projections, see `colab/05_methods_comparison.ipynb`) it runs.

    ## The table

    *letters*: share of answer letters in the right place on 30 held-out words (after one
    pass over the data no method gets whole words right yet, so exact match would read 0%
    everywhere); *eval_loss*: loss on those words; *trainable*: parameters that
    receive gradients; *time*: training wall time on this machine; *memory*: the
    calculator's predicted peak for one step.
    """),
    code("""
    from IPython.display import HTML

    columns = [("letters", "{:.0%}"), ("eval_loss", "{:.3f}"), ("trainable", "{:,}"),
               ("seconds", "{:.1f}"), ("memory_mib", "{:.2f}")]
    head = "<th>method</th>" + "".join(f"<th>{name}</th>" for name, _ in columns)
    body = "".join(f"<tr><td>{method}</td>" + "".join(f"<td>{fmt.format(row[name])}</td>" for name, fmt in columns)
                   + "</tr>" for method, row in results.items())
    HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    """),
    md("""
    ## The chart

    One bar chart per measure, drawn as inline SVG so it shows on GitHub and in any notebook
    viewer without a plotting library. Trainable parameters are on a log scale: they span
    four orders of magnitude.
    """),
    code("""
    import html
    import math

    def bar_chart(title, values, fmt, log=False, width=300, bar=16):
        top = max(values.values()) or 1
        scale = (lambda v: math.log10(max(v, 1)) / math.log10(max(top, 10))) if log else (lambda v: v / top)
        rows = []
        for i, (label, value) in enumerate(values.items()):
            y = 24 + i * (bar + 6)
            length = max(1, scale(value) * (width - 170))
            rows.append(f'<text x="0" y="{y + 12}" font-size="12">{html.escape(label)}</text>'
                        f'<rect x="95" y="{y}" width="{length:.1f}" height="{bar}" fill="#4c78a8"/>'
                        f'<text x="{100 + length:.1f}" y="{y + 12}" font-size="11">{fmt.format(value)}</text>')
        height = 30 + len(values) * (bar + 6)
        # Text takes the notebook's text colour (currentColor), so the charts read on dark themes too.
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
                f'fill="currentColor">'
                f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>{"".join(rows)}</svg>')

    def column(name):
        return {method: row[name] for method, row in results.items()}

    charts = [
        bar_chart("letters right (held-out words)", column("letters"), "{:.0%}"),
        bar_chart("trainable parameters (log)", column("trainable"), "{:,}", log=True),
        bar_chart("training time (s)", column("seconds"), "{:.1f}"),
        bar_chart("predicted peak memory (MiB)", column("memory_mib"), "{:.2f}"),
    ]
    HTML('<div style="display:flex;flex-wrap:wrap;gap:24px">' + "".join(charts) + "</div>")
    """),
    md("""
    ## What to read from it

    * **Full fine-tuning** moves every weight and stores gradients and two optimizer states
      for all of them. At 7B that rules it out on one consumer GPU (see
      `02_memory_calculator`); on this 1M-parameter model activations dominate the memory
      of every method, so the memory column differs little here.
    * **LoRA** and **DoRA** train a fraction of the parameters (17% here: rank 16 is large
      for a model this small; on a 7B model it is about 0.6%) and keep up with full
      fine-tuning; DoRA costs more time per step.
    * **IA3** and **prompt tuning** train very few parameters. They are cheap to store and
      swap, but in one pass over the data they learn a new skill like reversal much more
      slowly than the adapters.
    * **freeze** (top block and head only) trains many parameters, but the lower blocks
      cannot adapt.

    One pass over 960 examples is far from convergence (the quickstart trains LoRA for many
    more steps to reach its exact match): these numbers compare the methods at equal, small
    cost. Times vary from run to run; the parameter counts and memory estimates do not.
    """),
    code("""
    print({method: f"{row['trainable']:,}" for method, row in results.items()})
    print("not run:", sorted(skipped))
    """, CHECK),
    code("""
    assert results["lora"]["letters"] > results["prompt_tuning"]["letters"], results
    assert results["ia3"]["trainable"] < results["lora"]["trainable"] < results["full"]["trainable"] / 4, results
    """),
]

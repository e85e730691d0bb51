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
    | `bitfit` | bias terms only (for models that have none, the norms' gains) |
    | `freeze` | the top blocks and the output head, the rest frozen |

    Each one here teaches the embedded `tiny` model to reverse words with the same data and
    the same number of steps, each with a learning rate suited to it. The runs are kept short
    so the notebook executes in about a minute on a laptop CPU: the numbers show the
    trade-offs, not the best each method can do.
    """),
    code("""
    %load_ext ftmagic
    import ftmagic
    from ftmagic.demo import demo_dataset, exact_match

    train = demo_dataset("train", n=960)
    test = demo_dataset("test", n=50)
    STEPS = 60

    # A learning rate per method: vectors and virtual tokens need larger steps than adapters.
    LR = {"full": 1e-3, "lora": 3e-3, "dora": 3e-3, "ia3": 3e-2, "prompt_tuning": 3e-2, "bitfit": 1e-2, "freeze": 1e-3}
    common = dict(model="tiny", data=train, max_steps=STEPS, batch_size=16, max_seq_len=128, lora_r=16,
                  lora_alpha=32, lora_dropout=0.0, num_virtual_tokens=8, trainable_layers=1, warmup=0.05,
                  eval_steps=0, save_steps=0, overwrite=True, seed=0)
    """),
    md("""
    `ftmagic.finetune` is the Python spelling of `%%finetune`: same configuration keys, same
    engine, a `RunResult` back. Without an `on_event` callback it trains quietly.
    """),
    code("""
    results = {}
    for method, lr in LR.items():
        ft = ftmagic.finetune(method=method, lr=lr, output_dir=f"runs/methods/{method}", **common)
        estimate = ftmagic.estimate_memory("tiny", method=method, batch_size=16, seq_len=128, precision="fp32",
                                           lora_r=16, num_virtual_tokens=8, trainable_layers=1, lora_dropout=0.0)
        results[method] = dict(
            accuracy=exact_match(lambda p: ft.generate(p, max_new_tokens=12), test),
            trainable=ft.metrics["trainable_params"],
            share=ft.metrics["trainable_params"] / ft.metrics["total_params"],
            seconds=ft.metrics["runtime_s"],
            memory_mib=estimate.total_bytes / 2**20,
            loss=ft.metrics["train_loss"],
        )
        print(f"{method:<14} done: loss {ft.metrics['train_loss']:.3f}")
    """),
    md("""
    ## The table

    *accuracy*: exact match on 50 held-out words; *trainable*: parameters that receive
    gradients; *time*: training wall time on this machine; *memory*: the calculator's
    predicted peak for one step (weights, gradients, optimizer states, activations, logits).
    """),
    code("""
    from IPython.display import HTML

    columns = [("method", "{}"), ("accuracy", "{:.0%}"), ("trainable", "{:,}"), ("share", "{:.2%}"),
               ("seconds", "{:.1f}"), ("memory_mib", "{:.2f}"), ("loss", "{:.3f}")]
    head = "".join(f"<th>{name}</th>" for name, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt.format(method if name == 'method' else row[name])}</td>" for name, fmt in columns) + "</tr>"
        for method, row in results.items())
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
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
                f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>{"".join(rows)}</svg>')

    charts = [
        bar_chart("accuracy (exact match)", {m: r["accuracy"] for m, r in results.items()}, "{:.0%}"),
        bar_chart("trainable parameters (log)", {m: r["trainable"] for m, r in results.items()}, "{:,}", log=True),
        bar_chart("training time (s)", {m: r["seconds"] for m, r in results.items()}, "{:.1f}"),
        bar_chart("predicted peak memory (MiB)", {m: r["memory_mib"] for m, r in results.items()}, "{:.2f}"),
    ]
    HTML('<div style="display:flex;flex-wrap:wrap;gap:24px">' + "".join(charts) + "</div>")
    """),
    md("""
    ## What to read from it

    * **Full fine-tuning** moves every weight; it learns fast but stores gradients and two
      optimizer states for all of them, so it needs the most memory. For a 7B model that
      rules it out on one consumer GPU (see `02_memory_calculator`).
    * **LoRA** and **DoRA** train a small fraction of the parameters and reach full
      fine-tuning's quality on tasks like this one; DoRA costs a little more time per step.
    * **IA3**, **prompt tuning** and **BitFit** train tiny numbers of parameters. They are
      cheap to store and swap, but learn a new skill like reversal much more slowly.
    * **freeze** (top block and head only) sits in between: no adapter code, many
      parameters, and the lower blocks cannot adapt.

    With a GPU and more steps the gaps change, and the memory column is where methods
    really differ at 7B scale. The numbers here are from one short run on a CPU:
    re-running the notebook gives slightly different times.

    Check the memory predictions against the actual peak sizes of the arrays with exact mode
    (`ftmagic.estimate_memory(..., mode="exact")`), shown in `02_memory_calculator`.
    """),
    code("""
    assert results["lora"]["accuracy"] > results["prompt_tuning"]["accuracy"], results
    assert results["lora"]["trainable"] < results["full"]["trainable"] / 10, results
    print("checked: LoRA beats prompt tuning here with a tenth of full fine-tuning's trainable parameters or less")
    """, CHECK),
]

"""colab/05_methods_comparison.ipynb: seven methods on Qwen2.5-0.5B-Instruct on a T4."""

from cells import code, colab_drive, colab_intro, md

NAME = "05_methods_comparison"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # its attention projections have biases, so BitFit applies

CELLS = [
    *colab_intro(NAME, "Seven fine-tuning methods on one task", f"""
    Full fine-tuning, LoRA, DoRA, IA3, prompt tuning, BitFit and freeze (top layers only)
    teach `{MODEL}` the same task with the same data and steps: accuracy, trainable
    parameters, time and peak GPU memory side by side. About 15 minutes on a T4.
    """),
    *colab_drive("methods"),
    code(f"""
    %load_ext ftmagic
    import os

    import ftmagic
    from ftmagic.demo import demo_dataset, exact_match

    MODEL = "{MODEL}"
    train = demo_dataset("train")
    test = demo_dataset("test", n=50)
    LR = {{"full": 5e-5, "lora": 1e-3, "dora": 1e-3, "ia3": 1e-2, "prompt_tuning": 3e-2, "bitfit": 5e-3, "freeze": 1e-4}}
    common = dict(model=MODEL, data=train, max_steps=150, batch_size=16, max_seq_len=128, lora_r=16, lora_alpha=32,
                  num_virtual_tokens=16, trainable_layers=4, eval_steps=0, save_steps=0, overwrite=True)
    """),
    code("""
    results = {}
    for method, lr in LR.items():
        try:
            ft = ftmagic.finetune(method=method, lr=lr, output_dir=os.path.join(OUT, method), **common)
        except ftmagic.FtmagicError as error:  # e.g. BitFit on a model without biases
            print(f"{method}: not run: {error}")
            continue
        results[method] = dict(accuracy=exact_match(lambda p: ft.generate(p, max_new_tokens=12), test),
                               trainable=ft.metrics["trainable_params"], seconds=ft.metrics["runtime_s"],
                               peak_gib=(ft.metrics["peak_memory_bytes"] or 0) / 2**30)
        print(method, results[method])
        del ft  # free the GPU before the next method
    """),
    code("""
    from IPython.display import HTML

    rows = "".join(f"<tr><td>{m}</td><td>{r['accuracy']:.0%}</td><td>{r['trainable']:,}</td>"
                   f"<td>{r['seconds']:.0f}</td><td>{r['peak_gib']:.2f}</td></tr>" for m, r in results.items())
    HTML("<table><tr><th>method</th><th>accuracy</th><th>trainable</th><th>seconds</th><th>peak GiB</th></tr>"
         + rows + "</table>")
    """),
    code("""
    def bars(title, values, fmt, width=320):
        top = max(values.values()) or 1
        body = "".join(
            f'<text x="0" y="{34 + i * 22}" font-size="12">{k}</text>'
            f'<rect x="95" y="{22 + i * 22}" width="{max(1, v / top * (width - 170)):.0f}" height="16" fill="#4c78a8"/>'
            f'<text x="{100 + max(1, v / top * (width - 170)):.0f}" y="{34 + i * 22}" font-size="11">{fmt.format(v)}</text>'
            for i, (k, v) in enumerate(values.items()))
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{30 + 22 * len(values)}" '
                f'font-family="sans-serif"><text x="0" y="14" font-weight="bold" font-size="13">{title}</text>{body}</svg>')

    HTML('<div style="display:flex;flex-wrap:wrap;gap:24px">'
         + bars("accuracy", {m: r["accuracy"] for m, r in results.items()}, "{:.0%}")
         + bars("training time (s)", {m: r["seconds"] for m, r in results.items()}, "{:.0f}")
         + bars("peak memory (GiB)", {m: r["peak_gib"] for m, r in results.items()}, "{:.2f}")
         + "</div>")
    """),
]

"""notebooks/07_export_gguf.ipynb: train, export to GGUF and Ollama, chat with the result through llama.cpp."""

from cells import CHECK, code, md

NAME = "07_export_gguf"
KIND = "notebooks"

CELLS = [
    md("""
    # Ship the tuned model: GGUF, llama.cpp and Ollama

    A run is only useful once another program can use it. This notebook trains the embedded
    tiny model to reverse words, exports it to GGUF (the format of llama.cpp, Ollama and LM
    Studio) with `%ft_export`, and chats with the GGUF file through llama.cpp, on the CPU,
    in this notebook. Then it checks what matters: the GGUF answers exactly like the model
    did in transformers.

    Two things make that true. The saved run describes itself: the template the model was
    trained with is the saved tokenizer's `chat_template` (and is embedded in every GGUF),
    and `generation_config.json` lists every token that ends an answer. And the GGUF is
    written by llama.cpp's own converter and quantizer, not by a look-alike.

    Needs `pip install 'ftmagic[gguf]'` (llama-cpp-python, built from source on first install).
    """),
    code("""
    %load_ext ftmagic
    from ftmagic.demo import DEMO_PROMPTS, demo_dataset, exact_match

    train = demo_dataset("train")
    test = demo_dataset("test")
    """),
    md("""
    ## Train

    LoRA on the demo task with the settings of `ftmagic demo` (`DEMO_CONFIG`), which teach
    the tiny model to reverse held-out words.
    """),
    code("""
    %%finetune --name ft
    model: tiny
    method: lora
    data: $train
    lora_r: 16
    lora_alpha: 32
    lora_dropout: 0.0
    lr: 3.0e-3
    max_steps: 800
    batch_size: 16
    max_seq_len: 128
    scheduler: cosine
    warmup: 0.05
    seed: 0
    eval_steps: 0
    save_steps: 0
    output_dir: runs/ship
    overwrite: true
    """),
    md("""
    ## Export

    `%ft_export` merges the adapter into the base weights, converts the merged model with
    llama.cpp's converter (`f16` and `q8_0` here; `q4_k_m` and the other k-quants go through
    llama.cpp's quantizer), and writes an Ollama `Modelfile` beside the files. It lists what
    it wrote, with sizes, and the commands that use it: vLLM, transformers, llama.cpp, Ollama.
    Nothing is overwritten silently: exporting again asks for `--overwrite`.

    The same export is `ft.export(["gguf", "ollama"], quant=["f16", "q8_0"])` from Python,
    `ftmagic export runs/ship --to gguf,ollama --quant f16,q8_0` from a shell, or
    `export: [gguf, ollama]` in the `%%finetune` cell itself.
    """),
    code("""
    %ft_export --to gguf,ollama --quant f16,q8_0
    """),
    md("""
    The Modelfile is the training template translated to Ollama's Go template syntax, with a
    `stop` for every token that ends an answer. `ollama create ship -f runs/ship/gguf/Modelfile`
    turns it into an Ollama model.
    """),
    code("""
    print(open("runs/ship/gguf/Modelfile").read())
    """, CHECK),
    md("""
    ## Chat with the GGUF through llama.cpp

    llama-cpp-python loads the file and builds its chat prompt from the template embedded in
    it; nothing from ftmagic is involved here.
    """),
    code("""
    from llama_cpp import Llama

    llm = Llama(model_path="runs/ship/gguf/ship-q8_0.gguf", n_ctx=256, verbose=False)
    for prompt in DEMO_PROMPTS:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=16)
        print(f"{prompt:<16} llama.cpp: {reply['choices'][0]['message']['content']:<8} transformers: {ft.generate(prompt)}")
    """),
    md("""
    ## Does the GGUF answer like the trained model?

    On the 100 held-out words: how often each GGUF gives exactly the answer transformers
    gives (greedy decoding, the same prompt text), and its exact match on the task. `f16`
    agrees on every word; `q8_0` on at least 90% of them.
    """),
    code("""
    def llama_answer(llm, prompt):
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=16)
        return reply["choices"][0]["message"]["content"].strip()

    prompts = [record["messages"][0]["content"] for record in test]
    reference = {prompt: ft.generate(prompt, max_new_tokens=16) for prompt in prompts}
    print(f"transformers: exact match {exact_match(reference.get, test):.0%}")
    agreement = {}
    for quant in ("f16", "q8_0"):
        model = Llama(model_path=f"runs/ship/gguf/ship-{quant}.gguf", n_ctx=256, verbose=False)
        answers = {prompt: llama_answer(model, prompt) for prompt in prompts}
        model.close()
        agreement[quant] = sum(answers[p] == reference[p] for p in prompts) / len(prompts)
        print(f"llama.cpp {quant:<5} exact match {exact_match(answers.get, test):.0%}, "
              f"same answer as transformers on {agreement[quant]:.0%} of the words")
    assert agreement["f16"] == 1.0 and agreement["q8_0"] >= 0.9, agreement
    """),
    md("""
    ## Other runtimes

    The run folder itself loads in any transformers program (the adapter through peft), and
    vLLM serves it with the commands `%ft_export` printed. `--to hub --repo you/name`
    uploads the adapter (or `merged`), the GGUF files and the Modelfile with a generated
    model card; the token comes from `HF_TOKEN` or `hf auth login` and is never written
    anywhere.
    """),
    code("""
    from transformers import pipeline
    from transformers.utils import logging

    logging.disable_progress_bar()
    chat = pipeline("text-generation", model="runs/ship")
    reply = chat([{"role": "user", "content": "reverse: kite"}], max_new_tokens=16, do_sample=False)
    answer = reply[0]["generated_text"][-1]["content"]
    print("transformers pipeline on runs/ship:", answer)
    assert answer.strip() == ft.generate("reverse: kite", max_new_tokens=16)
    """),
]

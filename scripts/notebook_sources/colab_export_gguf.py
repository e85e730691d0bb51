"""colab/07_export_gguf.ipynb: a Qwen LoRA run that ends as GGUF files, an Ollama Modelfile and (optionally) a Hub repo."""

from cells import code, colab_drive, colab_intro, md

NAME = "07_export_gguf"
KIND = "colab"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"

CELLS = [
    *colab_intro(NAME, "Ship a fine-tuned Qwen: GGUF for llama.cpp and Ollama, and the Hub", f"""
    Fine-tune `{MODEL}` with LoRA on a T4, and let the run end as files other programs use:
    a merged model, GGUF files in `q8_0` and `q4_k_m` (llama.cpp, Ollama, LM Studio), an
    Ollama `Modelfile`, and, if you log in, a Hugging Face repository with a model card.
    Then chat with the `q4_k_m` file through llama.cpp in this notebook.

    The install builds llama-cpp-python from source (llama.cpp's runtime and quantizer):
    several minutes on Colab, once per session.
    """, extras="gguf"),
    *colab_drive("ship"),
    code(f"""
    %load_ext ftmagic
    from ftmagic.demo import DEMO_PROMPTS, demo_dataset

    MODEL = "{MODEL}"
    train = demo_dataset("train")
    """),
    md("""
    ## Train, then export when the run ends

    `export:` and `gguf_quant:` in the cell export as soon as training ends: the adapter is
    merged into the base weights, llama.cpp's converter writes `q8_0`, its quantizer writes
    `q4_k_m`, and a Modelfile goes beside them. Add `push_to_hub: your-name/qwen-reverse`
    to upload everything too (after logging in, below).
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
    eval_steps: 0
    save_steps: 100
    overwrite: true
    export: [gguf, ollama]
    gguf_quant: [q8_0, q4_k_m]
    """),
    code("""
    print(ft.exports)
    """),
    md("""
    ## Chat with the GGUF through llama.cpp

    llama-cpp-python reads the chat template and the stop tokens from the file itself.
    """),
    code("""
    from llama_cpp import Llama

    gguf = ft.exports.paths("GGUF")[-1]  # the q4_k_m file
    llm = Llama(model_path=gguf, n_ctx=512, verbose=False)
    for prompt in DEMO_PROMPTS:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=16)
        print(f"{prompt:<16} llama.cpp: {reply['choices'][0]['message']['content']:<8} transformers: {ft.generate(prompt)}")
    """),
    md("""
    ## Ollama

    Download the `gguf` folder of the run (it holds the GGUF files and the `Modelfile`) and,
    on a machine with Ollama, run the `ollama create` command printed above in that folder.

    ## The Hugging Face Hub

    Log in once (the token stays with `huggingface_hub`; ftmagic never writes it anywhere),
    then upload the adapter, the GGUF files and the Modelfile with a generated model card.
    Uncomment to run:
    """),
    code("""
    # from huggingface_hub import notebook_login
    # notebook_login()
    # print(ft.export(["gguf", "hub"], repo_id="your-name/qwen2.5-0.5b-reverse"))
    """),
]

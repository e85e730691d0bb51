"""Export a finished run: merged weights, GGUF, an Ollama Modelfile, the Hugging Face Hub.

One entry point, :func:`export_run`, behind ``RunResult.export(...)``, ``ftmagic export``,
``%ft_export`` and the config keys ``export:`` / ``push_to_hub:`` (run when training ends,
:func:`export_after_run`). Steps run in this order, each only when asked for or needed
by a later one:

1. ``merged``: the adapter folded into an unquantized copy of the base (``RUN/merged``);
   a fully fine-tuned run already is full weights. A reward model or classifier is merged
   with its sequence-classification head and label names; it writes no text, so ``gguf``
   and ``ollama`` refuse it before any work (:func:`~ftmagic.export.targets.refuse_text_targets`).
2. ``gguf``: llama.cpp's converter on the merged folder (``RUN/gguf/NAME-QUANT.gguf``),
   then its quantizer for the k-quants.
3. ``ollama``: ``RUN/gguf/Modelfile`` beside the GGUF.
4. ``hub``: one commit with the model (adapter, or merged when asked), GGUF files and
   Modelfile when made, a model card and the loss curve.

Every output is written atomically. An output an earlier export of the same weights
wrote is used as it is (listed as "already there"); one older than the run's weights
(the run was resumed and trained further since) is refused, and so is a ``merged`` or
``gguf`` folder the run's manifest does not list (the user's own); ``overwrite`` rebuilds
either. Progress goes through ``on_event`` as :class:`ftmagic.events.Message` events.

Example::

    summary = result.export(["gguf", "ollama"], quant=["f16", "q8_0"])
    print(summary)       # files with sizes, then the commands to use them
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

from ftmagic.constants import RUN_FILE
from ftmagic.engine.outdir import record_outputs
from ftmagic.errors import ExportError
from ftmagic.events import Message
from ftmagic.export.files import atomic_target, path_size
from ftmagic.export.summary import (ExportSummary, head_snippet, llama_cpp_commands, pipeline_snippet,
                                    vllm_lora_command, vllm_model_command, vllm_serves_adapter)
from ftmagic.export.targets import (GGUF_TYPES, REPO_ID_RULE, check_quants, check_targets, is_repo_id,
                                    refuse_text_targets)
from ftmagic.methods import get_method_spec
from ftmagic.units import format_bytes

MERGED_DIR = "merged"
GGUF_DIR = "gguf"
MODELFILE = "Modelfile"


def export_run(run, to, *, quant=None, repo_id: Optional[str] = None, overwrite: bool = False,
               private: Optional[bool] = None, on_event: Optional[Callable] = None,
               hub_api=None) -> ExportSummary:
    """Export ``run`` (a :class:`~ftmagic.engine.result.RunResult`) to the targets in ``to``.

    ``to``: ``"gguf"``, ``"merged,gguf"`` or a list of ``merged``, ``gguf``, ``ollama``, ``hub``.
    ``quant``: GGUF types (default: the run's ``gguf_quant``). ``repo_id``: for ``hub``
    (default: the run's ``push_to_hub``). ``hub_api``: an ``HfApi``-like client (tests).

    Example::

        export_run(result, "gguf", quant="q4_k_m")
    """
    emit = on_event or (lambda event: None)
    config = run.config
    targets = check_targets(to, key="to")
    if not targets:
        raise ExportError("nothing to export: choose one or more of merged, gguf, ollama, hub")
    refuse_text_targets(targets, run.objective)  # a classifier or reward model: before anything is merged
    quants = check_quants(quant if quant else getattr(config, "gguf_quant", "q8_0"), key="quant")
    if not quants:
        raise ExportError("no GGUF type given; choose e.g. `q8_0`")
    repo_id = repo_id or getattr(config, "push_to_hub", None)
    if "hub" in targets and not repo_id:
        raise ExportError("`hub` needs a repository id: pass repo_id='user/name' (`--repo user/name`) "
                          "or set `push_to_hub` in the run's config")
    if "hub" in targets and not is_repo_id(repo_id):
        raise ExportError(f"`repo: {repo_id}` must be {REPO_ID_RULE}")  # before any merging or converting
    private = getattr(config, "hub_private", True) if private is None else private
    if "ollama" in targets and "gguf" not in targets:
        targets = check_targets(targets + ["gguf"])  # the Modelfile needs a GGUF beside it

    run_dir = Path(run.output_dir)
    summary = ExportSummary(run_dir=str(run_dir))
    name = _file_stem(run_dir)
    method = run.method or getattr(config, "method", "")
    needs_weights = bool({"merged", "gguf", "ollama"} & set(targets))
    spec = get_method_spec(method)
    if needs_weights and spec.adapter and not spec.mergeable:
        raise ExportError(f"`method: {method}` trains virtual tokens that cannot be folded into the weights, so it "
                          "cannot become merged weights, GGUF or an Ollama model; the Hub upload (`--to hub`) works")

    written = ([MERGED_DIR] if needs_weights and run._is_adapter() else []) + ([GGUF_DIR] if "gguf" in targets else [])
    _refuse_foreign(run_dir, written, overwrite)  # before any work
    model_dir = None
    if needs_weights:
        model_dir = _merged(run, run_dir, summary, explicit="merged" in targets, overwrite=overwrite, emit=emit)
    ggufs: list = []
    if "gguf" in targets:
        ggufs = _gguf(run, model_dir, run_dir / GGUF_DIR, name, quants, summary, overwrite=overwrite, emit=emit)
    if "ollama" in targets:
        _ollama(run, run_dir / GGUF_DIR, ggufs[0], name, summary, overwrite=overwrite, emit=emit)
    if "hub" in targets:
        _hub(run, repo_id, summary, model_dir=model_dir if "merged" in targets else None, ggufs=ggufs,
             private=private, api=hub_api, emit=emit)
    _commands(run, run_dir, summary, ggufs)
    # The run's manifest lists what its exports wrote, so `overwrite: true` may remove them and nothing else.
    record_outputs(run_dir, [name for name in written if (run_dir / name).exists()])
    return summary


def export_after_run(result, emit) -> None:
    """Run the config's ``export:`` / ``push_to_hub:`` at the end of training.

    A failed export does not undo the run: it ends in a warning that says how to retry,
    and the result keeps the reason in ``result.export_error``.
    """
    config = result.config
    targets = check_targets(getattr(config, "export", None) or [])
    if getattr(config, "push_to_hub", None) and "hub" not in targets:
        targets.append("hub")
    if not targets:
        return
    try:
        result.exports = export_run(result, targets, on_event=emit)
    except ExportError as exc:
        result.export_error = str(exc)
        _say(emit, f"export failed: {exc} (the run is saved; retry with `ftmagic export {result.output_dir} "
                   f"--to {','.join(targets)}`)", level="warning")
        return
    for f in result.exports.files:
        _say(emit, f"exported {f.kind}: {f.path} ({format_bytes(f.size)})")
    if result.exports.hub_url:
        _say(emit, f"uploaded to {result.exports.hub_url}")


# --------------------------------------------------------------------------- steps


def _file_stem(run_dir: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.resolve().name).strip("-.") or "model"


# The files that hold a run's trained weights; exports newer than these are exports of them.
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def _refuse_foreign(run_dir: Path, names: list, overwrite: bool) -> None:
    """Raise when one of the folders an export writes (``merged``, ``gguf``) is there but not the run's own.

    The run's manifest (``ftmagic_run.json``) lists what the run and its exports wrote; a folder it does
    not list is the user's (made after training), and an export would otherwise replace it or write into
    it, and record it as the run's, so that a later ``overwrite: true`` run removed it.
    """
    from ftmagic.engine.outdir import owned_names, read_record

    if overwrite:
        return
    present = {name for name in names if (run_dir / name).exists()}
    owned = owned_names(read_record(run_dir), present)
    foreign = [name for name in names if name in present and name not in owned]
    if foreign:
        raise ExportError(f"`{run_dir / foreign[0]}` is there but this run did not write it ({RUN_FILE} does not "
                          "list it); move it away, or pass overwrite=True (`--overwrite`) to replace it")


def _reuse(target: Path, run_dir: Path, overwrite: bool) -> bool:
    """True when ``target`` exists and was exported from the run's current weights (so it is kept).

    Raises when it exists but is older than the weights: it belongs to an earlier state of the run.
    """
    if overwrite or not target.exists():
        return False
    weights = [run_dir / name for name in _WEIGHT_FILES if (run_dir / name).is_file()]
    newest = max((p.stat().st_mtime for p in weights), default=0.0)
    if target.stat().st_mtime < newest:
        raise ExportError(f"`{target}` is older than the run's weights (the run trained further since); pass "
                          "overwrite=True (`--overwrite`) to export it again")
    return True


def _say(emit, text: str, level: str = "info") -> None:
    emit(Message(text=text, level=level))


def _merged(run, run_dir: Path, summary: ExportSummary, *, explicit: bool, overwrite: bool, emit) -> Path:
    """The folder of full weights a GGUF is converted from (made when it does not exist).

    ``explicit``: the user asked for ``merged`` (a full-weights run then says where its weights are).
    """
    if not run._is_adapter():
        if explicit:
            weights = [run_dir / name for name in _WEIGHT_FILES if (run_dir / name).is_file()]
            summary.add_file(run_dir, sum(path_size(p) for p in weights), "full weights", reused=True)
            summary.notes.append(f"`{run.method}` saves full weights, so {run_dir} itself is the merged model")
        return run_dir
    target = run_dir / MERGED_DIR
    head = run._head()
    if _reuse(target, run_dir, overwrite) and _has_head(target, head) and not _pads_read_token(target, run, head):
        summary.add_file(target, path_size(target), "merged model", reused=True)
        return target
    from ftmagic.engine.run import merge_adapter

    _say(emit, f"merging the adapter into the weights of {run.base_model_path}")
    with atomic_target(target, overwrite=True) as tmp:  # an incomplete folder is replaced
        # On the CPU (the trained model may still fill the GPU), in the base's own stored precision; a reward
        # model or classifier keeps its trained head and label names, as the run-end `merge: true` does.
        # A QLoRA adapter folds into the 4-bit weights it trained on, dequantized (see merge_adapter).
        merge_adapter(run_dir, run.base_model_path, tmp, device="cpu", dtype=stored_dtype(run.base_model_path),
                      trust_remote_code=bool(getattr(run.config, "trust_remote_code", False)), head=head,
                      quantized=run.method == "qlora", on_note=summary.notes.append)
    summary.add_file(target, path_size(target), "merged model")
    return target


def _config_of(model_dir: Path) -> Optional[dict]:
    """``model_dir``'s ``config.json`` (None when unreadable, {} when not an object)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else {}


def _pads_read_token(model_dir: Path, run, head: Optional[dict]) -> bool:
    """Whether a head model's folder names as pad the token its head reads (merged before ftmagic saved such
    heads with no pad id, see :func:`~ftmagic.engine.heads.export_pad_id`): transformers would misread it."""
    from ftmagic.engine.heads import text_end_ids

    pad = (_config_of(model_dir) or {}).get("pad_token_id")
    return head is not None and pad is not None and pad in text_end_ids(run.tokenizer)


def _has_head(model_dir: Path, head: Optional[dict]) -> bool:
    """Whether ``model_dir`` holds a complete model with the run's kind of head.

    A reward model's or classifier's folder merged without its head (an export from before
    heads were kept) is a plain language model: it is made again rather than kept.
    """
    config = _config_of(model_dir)
    if config is None:
        return False
    classes = config.get("architectures") or []
    has_head = any(str(name).endswith("ForSequenceClassification") for name in classes)
    return has_head == (head is not None) or not classes


def _gguf(run, model_dir: Path, gguf_dir: Path, name: str, quants: list, summary: ExportSummary, *,
          overwrite: bool, emit) -> list:
    from ftmagic.data.portable import end_of_turn
    from ftmagic.data.templates import adds_bos
    from ftmagic.engine.export.llamacpp import convert_to_gguf, quantize_gguf, require_quantizer
    from ftmagic.engine.export.saved import run_template

    run_dir = Path(run.output_dir)
    requested = list(quants)
    targets = {q: gguf_dir / f"{name}-{q}.gguf" for q in quants}
    made = []
    for quant, path in list(targets.items()):
        if _reuse(path, run_dir, overwrite):
            made.append(path)
            summary.add_file(path, path_size(path), f"GGUF {quant}", reused=True)
            del targets[quant]
    quants = [q for q in quants if q in targets]
    needs_quantizer = [q for q in quants if GGUF_TYPES[q].tool == "quantizer"]
    if needs_quantizer:
        require_quantizer(needs_quantizer[0])  # before any work: a missing piece is said at once
    tokenizer = run.tokenizer
    eot = end_of_turn(tokenizer, run_template(tokenizer, run.config))
    metadata = {"name": name, "add_bos": adds_bos(tokenizer),
                "eot_id": tokenizer.convert_tokens_to_ids(eot) if eot else None}
    f16_source = next((p for p in made if p.name.endswith("-f16.gguf")), None)
    for quant in [q for q in quants if GGUF_TYPES[q].tool == "converter"]:
        _say(emit, f"converting {model_dir} to GGUF {quant} with llama.cpp's converter")
        with atomic_target(targets[quant], overwrite=True) as tmp:  # `_reuse` decided about an existing file
            convert_to_gguf(model_dir, tmp, quant, metadata=metadata)
        made.append(targets[quant])
        summary.add_file(targets[quant], path_size(targets[quant]), f"GGUF {quant}")
        if quant == "f16":
            f16_source = targets[quant]
    if needs_quantizer:
        scratch = None
        try:
            if f16_source is None:
                gguf_dir.mkdir(parents=True, exist_ok=True)
                scratch = gguf_dir / f".{name}-f16.quantize-source.gguf"
                _say(emit, f"converting {model_dir} to GGUF f16 (the quantizer's input)")
                convert_to_gguf(model_dir, scratch, "f16", metadata=metadata)
                f16_source = scratch
            for quant in needs_quantizer:
                _say(emit, f"quantizing to {quant} with llama.cpp's quantizer")
                with atomic_target(targets[quant], overwrite=True) as tmp:
                    quantize_gguf(f16_source, tmp, quant)
                made.append(targets[quant])
                summary.add_file(targets[quant], path_size(targets[quant]), f"GGUF {quant}")
        finally:
            if scratch is not None and scratch.exists():
                scratch.unlink()
    order = {q: i for i, q in enumerate(requested)}
    return sorted(made, key=lambda p: order[p.stem.rsplit("-", 1)[-1]])


def _ollama(run, gguf_dir: Path, gguf_file: Path, name: str, summary: ExportSummary, *, overwrite: bool,
            emit) -> Path:
    from ftmagic.data.portable import answer_end_texts
    from ftmagic.engine.export.saved import run_template
    from ftmagic.export.ollama import (GO_TEMPLATES, modelfile, named_equivalent, ollama_create_command,
                                       ollama_model_name)
    from ftmagic.export.files import write_text_atomic

    path = gguf_dir / MODELFILE
    model_name = ollama_model_name(name)
    summary.commands["Ollama"] = f"{ollama_create_command(model_name, path)}\nollama run {model_name}"
    if _reuse(path, Path(run.output_dir), overwrite):
        if f"FROM ./{gguf_file.name}" not in path.read_text(encoding="utf-8").splitlines():
            raise ExportError(f"`{path}` is there and points at another GGUF file than {gguf_file.name}; pass "
                              "overwrite=True (`--overwrite`) to write it for this one")
        summary.add_file(path, path_size(path), "Ollama Modelfile", reused=True)
        return path
    tokenizer = run.tokenizer
    tpl = run_template(tokenizer, run.config)
    named = named_equivalent(tokenizer, tpl)
    text = modelfile(gguf_file.name, go_template=GO_TEMPLATES.get(named) if named else None,
                     stops=answer_end_texts(tokenizer, tpl), system=getattr(run.config, "system_prompt", None),
                     run_name=name, untranslated=tpl.name)
    if named is None:
        summary.notes.append(f"the training template ({tpl.name}) has no Ollama translation, so the Modelfile has no "
                             "TEMPLATE line and Ollama guesses the prompt format; llama.cpp and transformers use the "
                             "exact template")
    write_text_atomic(path, text, overwrite=True)
    summary.add_file(path, path_size(path), "Ollama Modelfile")
    _say(emit, f"wrote {path}")
    return path


def stored_dtype(model_path):
    """The precision a model's weights are published in (config.json's dtype): bf16, fp16 or fp32.

    A merged model is saved in it: fp32 for a bf16 model would double its size for nothing.
    """
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_path))
    except (OSError, ValueError):
        return torch.float32
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if value in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _hub(run, repo_id: str, summary: ExportSummary, *, model_dir: Optional[Path], ggufs: list, private: bool,
         api, emit) -> None:
    from ftmagic.engine.export.hub import model_files, push_files
    from ftmagic.export.card import LOSS_CURVE_FILE, loss_curve_svg, model_card

    run_dir = Path(run.output_dir)
    if model_dir is not None and model_dir != run_dir:
        files = model_files(model_dir) + model_files(run_dir, prefix="adapter/")
        adapter_at_root = False
    else:
        files = model_files(run_dir)
        adapter_at_root = run._is_adapter()
    for path in ggufs:
        files.append((str(path), path.name))
    modelfile_path = run_dir / GGUF_DIR / MODELFILE
    if ggufs and modelfile_path.is_file():
        files.append((str(modelfile_path), MODELFILE))
    info = card_info(run, repo_id, adapter=adapter_at_root, gguf_files=[p.name for p in ggufs],
                     model_dir=model_dir if model_dir is not None else run_dir)
    extra = {"README.md": model_card(info).encode("utf-8")}
    svg = loss_curve_svg(run.history)
    if svg is not None:
        extra[LOSS_CURVE_FILE] = svg.encode("utf-8")
    _say(emit, f"uploading {len(files) + len(extra)} files to the Hub repository {repo_id}")
    summary.hub_url = push_files(repo_id, files, extra, private=private, api=api)


def card_info(run, repo_id: str, *, adapter: bool, gguf_files: list, model_dir: Optional[Path] = None):
    """The model card's facts about ``run``; ``model_dir``: the folder at the repository's root."""
    from ftmagic.export.card import CardInfo, is_hub_id

    config = run.config
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    base = getattr(config, "model", None) or str(run.base_model_path)
    data = cfg.get("data")
    datasets = [data] if isinstance(data, str) and is_hub_id(data) else []
    plan = run.plan or {}
    return CardInfo(repo_id=repo_id, base_model=base, method=run.method or cfg.get("method", ""), adapter=adapter,
                    config=cfg, metrics=dict(run.metrics or {}), history=list(run.history or []),
                    license=base_license(run.base_model_path), datasets=datasets, gguf_files=gguf_files,
                    precision=plan.get("precision"), device=plan.get("device"),
                    objective=getattr(run, "objective", "sft"), labels=getattr(run, "labels", None),
                    eos_after_text=_eos_by_hand(run, model_dir), one_text=_one_text(run, model_dir, adapter=adapter))


def _eos_by_hand(run, model_dir: Optional[Path]) -> bool:
    """Whether a snippet that loads the tokenizer of ``model_dir`` must add the EOS a classifier's texts
    ended with: the folder's own tokenizer appends it (see engine/export/saved.py), except in folders
    saved before it did or whose tokenizer class could not keep it. Read from the folder the snippet
    loads, not from the live tokenizer, which never appends it."""
    from ftmagic.data.pairs import eos_after_text
    from ftmagic.engine.models import load_tokenizer

    if getattr(run, "objective", "sft") != "classify":
        return False
    tokenizer = run.tokenizer
    if model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code=bool(getattr(run.config, "trust_remote_code", False)))
    return eos_after_text(tokenizer)


def folder_card(run, folder: Path, *, adapter: bool) -> dict:
    """``{file name: text}`` for the run's own folder: ftmagic's model card as ``README.md`` (the
    Hub card, naming the folder instead of a repository) and the loss curve it shows.

    Written when the run ends in place of the empty template (``More Information Needed``)
    that peft's ``save_pretrained`` leaves there. ``folder``: where the weights were saved.
    """
    from ftmagic.export.card import LOSS_CURVE_FILE, loss_curve_svg, model_card

    info = card_info(run, str(Path(run.output_dir).resolve()), adapter=adapter, gguf_files=[], model_dir=folder)
    info.folder = True
    files = {"README.md": model_card(info)}
    svg = loss_curve_svg(run.history)
    if svg is not None:
        files[LOSS_CURVE_FILE] = svg
    return files


def _one_text(run, model_dir: Optional[Path], *, adapter: bool) -> bool:
    """Whether plain transformers loads the head model of ``model_dir`` with no pad token, so one text per call.

    A merged or full-weights folder says so itself (ftmagic saved it without a pad the head reads); an adapter
    loads its base, whose own config may name no pad, or as pad the EOS the head reads (the card's snippet
    then drops it).
    """
    from ftmagic.engine.heads import export_pad_id, text_end_ids

    if run._head() is None or model_dir is None:
        return False
    if not adapter:
        return (_config_of(model_dir) or {}).get("pad_token_id") is None
    pad = (_config_of(Path(str(run.base_model_path))) or {}).get("pad_token_id")
    return export_pad_id(pad, text_end_ids(run.tokenizer)) is None


def base_license(base_path) -> Optional[str]:
    """The base model's license from its model card (a local folder or the Hub cache), when there is one."""
    card = None
    folder = Path(str(base_path)).expanduser()
    if (folder / "README.md").is_file():
        card = folder / "README.md"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(base_path), "README.md")
            card = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - not a Hub id, no cache: the license is simply unknown
            card = None
    if card is None:
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a card without readable metadata
        return None


def _commands(run, run_dir: Path, summary: ExportSummary, ggufs: list) -> None:
    config = run.config
    if run._head() is not None:
        _head_commands(run, run_dir, summary)
        return
    summary.commands["transformers"] = pipeline_snippet(str(run_dir))
    merged = run_dir / MERGED_DIR
    if run._is_adapter() and vllm_serves_adapter(run.method):
        serve = vllm_lora_command(str(run.base_model_path), str(run_dir), name=_file_stem(run_dir),
                                  rank=int(getattr(config, "lora_r", 16)))
        if (merged / "config.json").is_file():
            serve += "\n" + vllm_model_command(str(merged)) + "   # or the merged model"
        summary.commands["vLLM"] = serve
    elif not run._is_adapter():
        summary.commands["vLLM"] = vllm_model_command(str(run_dir))
    elif (merged / "config.json").is_file():
        summary.commands["vLLM"] = vllm_model_command(str(merged))
    else:
        summary.notes.append(f"vLLM serves `{run.method}` runs merged: export `--to merged` first")
    if ggufs:
        summary.commands["llama.cpp"] = llama_cpp_commands(str(ggufs[0]))


def _head_commands(run, run_dir: Path, summary: ExportSummary) -> None:
    """A reward model or classifier: transformers loads the full weights with their head; it writes no text,
    so no generation pipeline, vLLM LoRA server or llama.cpp command applies."""
    model_dir = run_dir / MERGED_DIR if run._is_adapter() else run_dir
    if (model_dir / "config.json").is_file():
        one_text = (_config_of(model_dir) or {}).get("pad_token_id") is None
        summary.commands["transformers"] = head_snippet(str(model_dir), run.objective, one_text=one_text,
                                                        eos_after_text=_eos_by_hand(run, model_dir))
        if one_text:
            # ftmagic leaves the pad out where it is the EOS the head reads (see engine/heads.export_pad_id).
            summary.notes.append("the model's config names no pad token, so transformers scores one text per call "
                                 "(as the snippet and a text-classification pipeline do); a batch of several raises")
    else:
        summary.notes.append(f"transformers loads an `objective: {run.objective}` run with its head from the merged "
                             "model: export `--to merged`")

"""The %ft_memory widget and magic, the `ftmagic estimate` CLI (plain pytest, no browser)."""

from __future__ import annotations

import html
import json

import pytest

from ftmagic.cli import main
from ftmagic.memory import estimate_memory
from ftmagic.memory.suggest import check_fit
from ftmagic.widgets.memory import MemoryCalculator, bar_html, suggestions_html, text_report, verdict_html


def _recompute_ms(calc) -> float:
    """Best of three recomputations: a busy CI machine's pauses are not the calculator's work."""
    times = [calc.last_ms]
    for _ in range(2):
        calc.update()
        times.append(calc.last_ms)
    return min(times)


def test_widget_recomputes_verdict_and_suggestions_on_a_control_change():
    calc = MemoryCalculator(model="llama-3.1-8b", method="qlora", batch_size=1, seq_len=512,
                            gradient_checkpointing=True, gpu="T4")
    assert calc.verdict.fits and calc.verdict.suggestions == []
    assert "fits</b></span> T4" in calc.verdict_box.value
    before = calc.estimate.total_bytes
    calc.controls["batch_size"].value = 16  # one control change
    assert calc.estimate.total_bytes > before
    assert not calc.verdict.fits
    assert "does not fit" in calc.verdict_box.value
    assert calc.verdict.suggestions and "What to change" in calc.suggestions_box.value
    assert html.escape(calc.verdict.suggestions[0].label) in calc.suggestions_box.value
    assert _recompute_ms(calc) < 20
    calc.controls["gpu"].value = "A100 80GB"
    assert calc.verdict.fits and calc.suggestions_box.value == ""


def test_widget_shows_a_bad_model_as_one_line_and_recovers():
    calc = MemoryCalculator(model="smollm2-135m", gpu="T4")
    calc.controls["model"].value = "not-a-model"
    assert calc.verdict is None and "not-a-model" in calc.verdict_box.value and calc.bar.value == ""
    calc.controls["model"].value = "qwen2.5-0.5b"
    assert calc.error is None and calc.estimate.model == "qwen2.5-0.5b"


def test_every_control_change_is_fast():
    calc = MemoryCalculator(model="llama-3.2-3b", gpu="L4")
    for key, value in [("method", "full"), ("precision", "fp32"), ("seq_len", 4096), ("optimizer", "adamw_8bit"),
                       ("lora_r", 64), ("gradient_checkpointing", True), ("gpu", "RTX 4090")]:
        calc.controls[key].value = value
        assert _recompute_ms(calc) < 20, key
        assert calc.estimate.settings.get(key, value) == value or key == "gpu"


def test_pure_html_pieces():
    verdict = check_fit("llama-3.2-1b", "T4", method="full", batch_size=8, seq_len=2048)
    est = verdict.estimate
    bar = bar_html(est, 16 * 2 ** 30)
    assert bar.count("<rect") == sum(1 for v in est.breakdown.values() if v > 0) + 1  # + context/headroom
    assert "stroke=\"#d62728\"" in bar  # the GPU limit line
    assert "does not fit" in verdict_html(verdict)
    listing = suggestions_html(verdict.suggestions)
    assert listing.count("<li>") == len(verdict.suggestions)
    text = text_report(verdict)
    assert text.splitlines()[0] == verdict.message and "peak (" in text


def test_magic_text_report(shell, capsys):
    shell.run_line_magic("ft_memory", "llama-3.2-1b --method qlora --batch-size 2 --seq-len 1024 --gpu T4 --text")
    out = capsys.readouterr().out
    assert out.startswith("fits T4") or out.startswith("does not fit T4")
    assert "frozen weights" in out


def test_the_text_report_says_when_exact_mode_fell_back(shell, capsys):
    shell.run_line_magic("ft_memory", "tiny --method prefix_tuning --exact --text")
    out = capsys.readouterr().out
    assert "  note: exact mode fell back to the analytic estimate: `prefix_tuning`'s virtual tokens are not traced" in out


def test_a_quoted_gpu_name_with_a_space_is_that_gpu(shell, capsys):
    shell.run_line_magic("ft_memory", 'llama-3.2-1b --method qlora --gpu "A100 40GB" --text')
    out = capsys.readouterr().out
    assert out.startswith("fits A100 40GB"), out


def test_magic_widget_and_usage_errors(shell):
    from IPython.core.error import UsageError

    shell.run_line_magic("ft_memory", "smollm2-135m --gpu L4")  # displays the widget
    with pytest.raises(UsageError, match="method: lorra"):
        shell.run_line_magic("ft_memory", "smollm2-135m --method lorra")
    with pytest.raises(UsageError, match="is not a built-in name"):
        shell.run_line_magic("ft_memory", "no-such-model")


def test_cli_json(capsys):
    assert main(["estimate", "llama-3.2-1b", "--method", "qlora", "--batch-size", "2", "--seq-len", "1024",
                 "--gpu", "T4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = estimate_memory("llama-3.2-1b", method="qlora", batch_size=2, seq_len=1024, bf16_supported=False)
    assert out["total_bytes"] == expected.total_bytes
    assert out["breakdown"] == expected.breakdown
    assert out["gpu"]["name"] == "T4" and isinstance(out["fits"], bool)


def test_cli_text_and_errors(capsys):
    assert main(["estimate", "smollm2-135m", "--gpu", "T4"]) == 0
    assert "fits T4" in capsys.readouterr().out
    for argv, fragment in [(["estimate", "llama-42b"], "llama-42b"),
                           (["estimate", "llama-3.2-1b", "--batch-size", "0"], "batch_size: 0"),
                           (["estimate", "llama-3.2-1b", "--gpu", "Z80"], "Z80")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ftmagic: error: ") and fragment in err and err.count("\n") == 1


def test_bf16_on_a_t4_is_one_line_in_the_cli_the_magic_and_the_widget(shell, capsys):
    from IPython.core.error import UsageError

    line = "`precision: bf16` is not supported by T4 (compute capability below 8.0); use `precision: fp16` or `precision: auto`"
    assert main(["estimate", "smollm2-135m", "--precision", "bf16", "--gpu", "T4"]) == 2
    assert capsys.readouterr().err == f"ftmagic: error: {line}\n"
    with pytest.raises(UsageError, match=r"precision: bf16` is not supported by T4"):
        shell.run_line_magic("ft_memory", "smollm2-135m --precision bf16 --gpu T4 --text")
    calc = MemoryCalculator(model="smollm2-135m", precision="bf16", gpu="L4")
    assert calc.verdict.fits
    calc.controls["gpu"].value = "T4"  # the card changes under a bf16 run
    assert calc.verdict is None and calc.error == line

"""``%ft_export``: take the result of a ``%%finetune`` cell to merged weights, GGUF, Ollama or the Hub.

A line magic over ``RunResult.export``: it prints progress while llama.cpp converts and
then shows what was written (sizes, paths) and the commands to use it, as a table that
stays in the saved notebook. Nothing heavy is imported until it runs.

Example (in a notebook)::

    %ft_export --to gguf,ollama --quant q8_0
    %ft_export --to hub --repo me/reverse-words
    %ft_export --run runs/reverse --to gguf       # a finished run's folder, e.g. after a restart
"""

from __future__ import annotations

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ftmagic.usage import as_usage_error


@magics_class
class ExportMagics(Magics):
    """``%ft_export``."""

    @magic_arguments()
    @argument("--to", required=True, metavar="TARGETS",
              help="comma-separated: merged, gguf, ollama, hub (ollama includes gguf)")
    @argument("--quant", default=None, metavar="TYPES",
              help="GGUF types, comma-separated, e.g. f16,q8_0,q4_k_m (default: the run's gguf_quant)")
    @argument("--repo", default=None, metavar="USER/NAME", help="Hub repository (default: the run's push_to_hub)")
    @argument("--public", action="store_true", help="make a new Hub repository public (private by default)")
    @argument("--overwrite", action="store_true", help="replace files an earlier export wrote")
    @argument("--name", default="ft", help="variable holding the RunResult (default `ft`)")
    @argument("--run", metavar="OUTPUT_DIR", default=None, help="a finished run's output_dir instead of a variable")
    @line_magic
    def ft_export(self, line: str) -> None:
        """Export a fine-tuned run; show the files written, their sizes and how to use them.

        Example::

            %ft_export --to gguf,ollama
        """
        from IPython.display import display

        from ftmagic.export.summary import summary_html
        from ftmagic.widgets.finetune import parse_line, run_result

        args = parse_line(self.ft_export, line)
        result = run_result(self.shell.user_ns, args.name, args.run)
        with as_usage_error():
            summary = result.export(args.to, quant=args.quant, repo_id=args.repo, overwrite=args.overwrite,
                                    private=False if args.public else None, on_event=_print_progress)
        display({"text/plain": str(summary), "text/html": summary_html(summary)}, raw=True)


def _print_progress(event) -> None:
    if getattr(event, "kind", None) == "message":
        print(event.text, flush=True)

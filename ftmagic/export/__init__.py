"""Taking a finished run to other runtimes: the parts that need no torch.

The engine (:mod:`ftmagic.engine.export`) merges, converts, quantizes and uploads; this
package holds what it and the fronts share and what is pure text: the accepted targets
and GGUF types (:mod:`~ftmagic.export.targets`), safe atomic writes
(:mod:`~ftmagic.export.files`), the Ollama Modelfile (:mod:`~ftmagic.export.ollama`), the
Hub model card (:mod:`~ftmagic.export.card`) and the summary with its commands
(:mod:`~ftmagic.export.summary`).
"""

"""Sub-commands of the ``ftmagic`` CLI: each module has ``add_parser(parser)`` and ``run(args)``."""

"""The command line: ``aurora-train`` (:mod:`aurora_loop.cli.train`) and the ``aurora-loop``
tools (:mod:`aurora_loop.cli.tools` dispatches to one module per subcommand)."""

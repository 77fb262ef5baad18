"""Sub-commands of the ``cmamba`` CLI: each module has ``add_arguments`` and ``run``."""

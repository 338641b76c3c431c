"""Sub-commands of the ``paadet`` command line, one module each (``add_parser`` + ``run``)."""

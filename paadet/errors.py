"""The base of paadet's own errors: each carries a one-line message that names the file at fault."""


class PaadetError(Exception):
    """An input (file, flag, graph, checkpoint) that paadet cannot use; the message is one line."""

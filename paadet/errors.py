"""The base of paadet's own errors: each carries a one-line message that names the file at fault."""


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class PaadetError(Exception):
    """An input (file, flag, graph, checkpoint) that paadet cannot use; the message is one line."""

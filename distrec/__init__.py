"""distrec: synchronous multi-GPU training of DLRM-style recommendation models."""
import sys

__version__ = "0.1.0"


def print_error(line: str) -> None:
    """``line`` and its newline on stderr in one write: the ranks of a job share that stream, and print()
    writes the text and the newline apart, so another rank's line could land in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

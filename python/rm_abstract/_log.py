"""One place for the package's messages.

Everything goes to stderr with an ``rm_abstract:`` prefix so that a user can
grep one line out of their program's output, and so that nothing is printed to
stdout (which programs often parse).
"""
import sys

PREFIX = "rm_abstract: "
_verbose = True


def set_verbose(on):
    global _verbose
    _verbose = bool(on)


def info(msg):
    """Progress and status; silenced by verbose=False / RM_VERBOSE=0."""
    if _verbose:
        _write(msg)


def warn(msg):
    """Always shown: fallbacks and configuration problems must never be silent."""
    _write(msg)


_said = set()


def warn_once(key, msg):
    """A warning shown once per process for `key` (an ignored argument
    warned at every generate() would flood the output of a loop)."""
    if key not in _said:
        _said.add(key)
        _write(msg)


def _write(msg):
    try:
        sys.stderr.write(PREFIX + msg + "\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr must not break the user's program
        pass

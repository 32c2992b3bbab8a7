"""Errors in what a user asked for, told apart from failures of the work.

Checks that run before any work (config values, workdir, checkpoint lookup)
run inside :func:`checking_input`; an exception raised there is marked as an
input error, and the launchers print it as one line instead of a traceback
(set ``STOCHINTERP_TRACEBACK=1`` to see the traceback anyway). Exceptions
raised later, during the work, keep their traceback.
"""

from __future__ import annotations

import contextlib
import functools

_MARK = "_stochinterp_input_error"
# What the checks raise: bad values, missing or unusable paths, a busy workdir.
CHECK_ERRORS = (ValueError, OSError, RuntimeError)


@contextlib.contextmanager
def checking_input():
    """Marks the check errors raised inside as input errors, then re-raises."""
    try:
        yield
    except CHECK_ERRORS as e:
        mark(e)
        raise


def checks(function):
    """Decorator: runs ``function`` inside :func:`checking_input`."""

    @functools.wraps(function)
    def checked(*args, **kwargs):
        with checking_input():
            return function(*args, **kwargs)

    return checked


def mark(error: BaseException) -> BaseException:
    """Marks ``error`` as an input error and returns it (``raise mark(...)``)."""
    setattr(error, _MARK, True)
    return error


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` was raised by a check inside :func:`checking_input`."""
    return getattr(error, _MARK, False)

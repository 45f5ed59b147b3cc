"""The service's exception hierarchy. The gRPC servicer maps each class to one status code."""

from __future__ import annotations


class SelectionError(Exception):
    """Base class: a request the service refuses. The message says what was received and what was expected."""


class InvalidArgument(SelectionError, ValueError):
    """Malformed input: wrong shape or dtype, non-finite values, ids out of range, bad configuration."""


class NotFound(SelectionError, LookupError):
    """An unknown or closed session, or an unknown round."""


class AlreadyExists(SelectionError):
    """A round number that was already used."""


class FailedPrecondition(SelectionError):
    """A valid request made in the wrong state (round out of order, batches asked before embeddings)."""


class ResourceExhausted(SelectionError):
    """A limit was reached (too many rounds in flight, too many sessions)."""


class Unauthenticated(SelectionError):
    """A call that names a session without that session's token."""


class PermissionDenied(SelectionError):
    """A call that names a session with a token that is not that session's (another job's, or a stale one)."""


class SelectorFailure(SelectionError):
    """A selector worker failed while selecting; the round cannot be completed."""


class Cancelled(SelectionError):
    """A call whose work was withdrawn under it: its session was closed while the call ran (a stream of its
    batches, for one)."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


# How to install the selector side, for the messages of ``MissingExtra`` and of the commands that need it.
SELECTOR_INSTALL = (
    "install the selector side: pip install '.[cpu]' (or '.[gpu]') from a checkout, or the wheel that "
    "`make wheel` builds with the same extra (deploy/README.md, 'Installing by side')"
)

"""CREST selection service: facility-location coresets, sessions, and the gRPC server.

Importing this package loads neither Ray nor gRPC nor faiss; they load when their parts are used.
``InProcessSelection`` is the service's selection in a trainer's process, with no server
(``selector_service.inprocess``).
"""

from typing import Any

from selector_service.errors import (
    SELECTOR_INSTALL,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MissingExtra,
    NotFound,
    ResourceExhausted,
    SelectionError,
    SelectorFailure,
)

# The selection maths needs numba, which only the selector side's extras install. Without it (a trainer-only
# install) the package still imports, so that its commands (`selector_service.cli`) can say what to install.
try:
    from selector_service.coreset import (
        MinibatchCoreset,
        minibatch_coreset,
        minibatch_coresets,
        select_coreset,
        select_coresets,
    )
    from selector_service.facility_location import Coreset, facility_location
except ModuleNotFoundError as _exc:
    if _exc.name != "numba":
        raise
    _missing: ModuleNotFoundError | None = _exc
else:
    _missing = None


def __getattr__(name: str) -> Any:
    if name == "InProcessSelection" and _missing is None:  # loads gRPC's runtime: only when asked for
        from selector_service.inprocess import InProcessSelection

        return InProcessSelection
    if _missing is not None and name in __all__:
        raise MissingExtra(f"{_missing}: {SELECTOR_INSTALL}") from _missing
    raise AttributeError(f"module 'selector_service' has no attribute {name!r}")


__all__ = [
    "AlreadyExists",
    "Coreset",
    "FailedPrecondition",
    "InProcessSelection",
    "InvalidArgument",
    "MinibatchCoreset",
    "MissingExtra",
    "NotFound",
    "ResourceExhausted",
    "SelectionError",
    "SelectorFailure",
    "facility_location",
    "minibatch_coreset",
    "minibatch_coresets",
    "select_coreset",
    "select_coresets",
]

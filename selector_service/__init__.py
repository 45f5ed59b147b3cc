"""CREST selection service: facility-location coresets, sessions, and the gRPC server.

Importing this package loads neither Ray nor gRPC nor faiss; they load when their parts are used.
"""

from selector_service.coreset import (
    MinibatchCoreset,
    minibatch_coreset,
    minibatch_coresets,
    select_coreset,
    select_coresets,
)
from selector_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MissingExtra,
    NotFound,
    ResourceExhausted,
    SelectionError,
    SelectorFailure,
)
from selector_service.facility_location import Coreset, facility_location

__all__ = [
    "AlreadyExists",
    "Coreset",
    "FailedPrecondition",
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

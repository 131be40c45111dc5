"""Test suites for Store implementations, ckptkit's own and yours (see ``docs/storage.md``).

Needs pytest and hypothesis (``pip install pytest hypothesis``); nothing else in ckptkit imports
this package.
"""

import pytest

# Plain ``assert`` in the suites should report values as it does in test files; pytest rewrites
# only modules registered before their first import.
pytest.register_assert_rewrite("ckptkit.testing.store", "ckptkit.testing.state_machine")

from ckptkit.testing.model import (  # noqa: E402 - after the rewrite registration
    dirs_below,
    edge_ranges,
    expected_listing,
    keys_below,
    probe_prefixes,
)
from ckptkit.testing.raw import RawAccess, RawReader  # noqa: E402
from ckptkit.testing.state_machine import StoreStateMachine, run_state_machine  # noqa: E402
from ckptkit.testing.store import (  # noqa: E402
    DEFAULT_STATE_MACHINE_SETTINGS,
    SAMPLE_OBJECTS,
    ReadOnlyStoreContractTests,
    StoreContractTests,
)

__all__ = [
    "DEFAULT_STATE_MACHINE_SETTINGS",
    "SAMPLE_OBJECTS",
    "RawAccess",
    "RawReader",
    "ReadOnlyStoreContractTests",
    "StoreContractTests",
    "StoreStateMachine",
    "dirs_below",
    "edge_ranges",
    "expected_listing",
    "keys_below",
    "probe_prefixes",
    "run_state_machine",
]

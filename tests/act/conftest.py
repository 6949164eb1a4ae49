"""tests/act: the shared checks in _workers.py run inside the tests, so pytest rewrites their asserts too."""

import pytest

pytest.register_assert_rewrite("_workers")

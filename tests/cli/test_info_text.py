"""Small wording checks of `info` (issue 13: tool names printed twice)."""

from __future__ import annotations

from moeload.cli.info import _framework


def test_framework_name_is_not_repeated() -> None:
    assert _framework("deepspeed", "deepspeed 0.19.8") == "deepspeed 0.19.8"
    assert _framework("megatron-core", "0.16.1") == "megatron-core 0.16.1"
    assert _framework("synthetic", None) == "synthetic"

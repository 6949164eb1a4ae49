"""Where the expert shape comes from: given sizes, the workload the manifest names, or a flagged default."""

from __future__ import annotations

import pytest

from moeload.advise import resolve_shape
from moeload.errors import InputError


def test_given_sizes_win_and_go_together() -> None:
    s = resolve_shape({"model_name": "moeload-workload/cpu-demo"}, 64, 256, True)
    assert (s.hidden, s.ffn_hidden, s.gated, s.source) == (64, 256, True, "given")
    with pytest.raises(InputError, match="go together"):
        resolve_shape({}, 64, None)


@pytest.mark.parametrize("meta, want", [
    ({"model_name": "moeload-workload/cpu-demo"}, (128, 256, "workload cpu-demo")),
    ({"model_name": "gpt3-small-moe (DeepSpeed MoE, ep_size=2, seed 0)"}, (768, 3072, "workload gpt3-small-moe")),
    ({"extra": "{'config': {'workload': {'base': 'gpt3-medium-moe', 'expert_d_ff': 512}}}"},
     (1024, 512, "workload gpt3-medium-moe")),
])
def test_workload_named_by_the_manifest(meta, want) -> None:
    s = resolve_shape(meta)
    assert (s.hidden, s.ffn_hidden, s.source) == want


def test_unknown_model_gets_the_flagged_default() -> None:
    assert resolve_shape({"model_name": "my-llm"}).source.startswith("default")

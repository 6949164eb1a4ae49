"""The embedded MoE workload: a small GPT with MoE FFNs, trained on the local Python stdlib sources."""

from moeload.workloads.configs import CONFIGS, WorkloadConfig, get_config
from moeload.workloads.corpus import load_corpus, split
from moeload.workloads.model import BiasRouter, MoEGPT, MoELayer, RouterOutput, TopKRouter
from moeload.workloads.probes import attention_maps, reference_counts
from moeload.workloads.train import TrainResult, batches, build_model, evaluate, train

__all__ = [
    "BiasRouter",
    "CONFIGS",
    "MoEGPT",
    "MoELayer",
    "RouterOutput",
    "TopKRouter",
    "TrainResult",
    "WorkloadConfig",
    "attention_maps",
    "batches",
    "build_model",
    "evaluate",
    "get_config",
    "load_corpus",
    "reference_counts",
    "split",
    "train",
]

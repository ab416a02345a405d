"""``compile = true`` with ``compile-scope = "all"``: every per-step loop of the server stage
runs through torch.compile and computes what the eager path computes.
"""

import shutil

import numpy as np
import pytest
import torch

from fedbicross_flwr.fedbicross.config import FedBiCrossSettings
from fedbicross_flwr.fedbicross.method import run_fedbicross
from tests.tiny_models import TinyCNN, make_tiny

TINY = dict(num_clusters=2, noise_samples=8, synth_steps=3, synth_batch=8, synth_lr=0.1,
            bn_weight=0.1, num_examples=8, kmeans_n_init=2)


def _run(settings):
    clients = [make_tiny(seed) for seed in range(3)]
    return run_fedbicross(clients, in_channels=1, num_classes=3, settings=settings, device="cpu",
                          progress=False, student_factory=lambda: TinyCNN(), image_size=6)


def _graphs(settings, reset=True):
    """The result of a run and the number of graphs torch.compile made for it."""
    if reset:
        torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = _run(settings)
    return result, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile (inductor) needs a C++ compiler on CPU")
def test_compile_scope_all_compiles_every_stage_and_matches_eager():
    # Prepare
    eager = FedBiCrossSettings(**TINY)
    every_stage = eager.with_overrides(compile=True, compile_scope="all")
    # Execute
    reference = _run(eager)
    compiled, graphs = _graphs(every_stage)
    _, again = _graphs(every_stage, reset=False)
    # Assert: compiled synthesis alone makes one graph (its member forward); "all" adds the
    # noise-adaptation (train-mode BN) and soft-label (eval-mode BN) forwards and the bi-level
    # student forwards (train and validation splits); a second run, with new client copies,
    # noise-adapted copies and students, compiles nothing new
    assert graphs >= 4
    assert again == 0
    assert np.array_equal(compiled.assignment, reference.assignment)
    for a, b in zip(compiled.synthetic_examples, reference.synthetic_examples):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for state, ref_state in zip(compiled.cluster_models, reference.cluster_models):
        for name, value in state.items():
            assert torch.allclose(value.float(), ref_state[name].float(), rtol=1e-4,
                                  atol=1e-5), name
    assert np.allclose(compiled.weight_history, reference.weight_history, atol=1e-5)


def test_compile_scope_is_off_without_compile():
    assert not FedBiCrossSettings(compile_scope="all").compile_all
    assert not FedBiCrossSettings(compile=True).compile_all
    assert FedBiCrossSettings(compile=True, compile_scope="all").compile_all

"""FedBiCrossSettings: paper defaults and validation."""

import pytest

from fedbicross_flwr.fedbicross.settings import FedBiCrossSettings, cpu_budget_settings


def test_defaults_are_the_papers_values():
    # Prepare / Execute
    s = FedBiCrossSettings()
    # Assert (paper Sec. IV-A)
    assert (s.num_clusters, s.noise_samples, s.synth_steps, s.synth_batch) == (2, 256, 500, 256)
    assert (s.synth_lr, s.tv_weight, s.bn_weight, s.tau) == (0.05, 2.5e-5, 10.0, 20.0)
    assert s.val_fraction == 0.2
    assert s.noise_momentum == pytest.approx(1 - 0.9)  # beta = 0.9 on the old value
    assert s.noise_teacher_mode == "eval" and s.weights_mode == "bilevel"


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_clusters", 0),
        ("synth_batch", 1),
        ("bn_reduction", "max"),
        ("ensemble", "median"),
        ("val_fraction", 1.0),
        ("noise_momentum", 1.5),
        ("noise_teacher_mode", "both"),
        ("hypergrad_normalisation", "l1"),
        ("weights_mode", "random"),
        ("student_momentum", 1.0),
        ("tau", 0.0),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    # Execute / Assert
    with pytest.raises(ValueError, match=field):
        FedBiCrossSettings(**{field: value})


def test_overrides_are_validated_and_cpu_preset_differs_from_paper():
    # Execute
    preset = cpu_budget_settings(synth_steps=150)
    # Assert
    assert preset.synth_steps == 150 and preset.bn_weight < FedBiCrossSettings().bn_weight
    with pytest.raises(ValueError, match="jitter"):
        preset.with_overrides(jitter=-1)

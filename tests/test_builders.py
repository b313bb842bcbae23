"""The shared builders of tests/builders.py do what the tests rely on: seeded and reproducible,
the global RNG left alone after seeding, perturbations that reach every parameter, and a clear
error for a draw name they do not know."""

from __future__ import annotations

import pytest
import torch

from tests.builders import TINY_MODEL, perturbed, sensitized, tiny_draws, tiny_model


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = tiny_model(3), tiny_model(3), tiny_model(4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_sizes_follow_base_and_overrides_and_the_base_stays_as_it_was():
    before = dict(TINY_MODEL)
    model = tiny_model(0, vocab_size=20, latent_dim=6, hidden_size=48)
    assert model.text_head.weight.shape == (20, 48)
    assert dict(TINY_MODEL) == before
    with pytest.raises(TypeError):
        TINY_MODEL["hidden_size"] = 64  # read-only: one test cannot resize the others' model


def test_meta_device_model_has_shapes_and_no_storage():
    model = tiny_model(None, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.text_head.weight.shape == tiny_model(0).text_head.weight.shape


def test_perturbed_moves_every_parameter_reproducibly_without_the_global_rng():
    reference, one, two = tiny_model(0), tiny_model(0), tiny_model(0)
    torch.manual_seed(5)
    global_state = torch.get_rng_state()
    perturbed(one, seed=9)
    perturbed(two, seed=9)
    assert torch.equal(torch.get_rng_state(), global_state)  # a generator of its own
    for (name, p), q, r in zip(one.named_parameters(), two.parameters(), reference.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), f"{name} was not moved"


def test_sensitized_leaves_no_all_zero_parameter():
    fresh = tiny_model(0)
    zero = [name for name, p in fresh.named_parameters() if not bool(p.any())]
    assert zero, "the fresh model has zero-initialised parameters (mmdit's gates): the control of this test"
    model = sensitized(tiny_model(0), seed=1000)
    assert [name for name, p in model.named_parameters() if not bool(p.any())] == []


def test_draws_are_seeded_shaped_and_distributed_by_name():
    names = ["latent_noise", "latent_t", "mask_uniform", "pseudo_token_uniform"]
    draws = tiny_draws(names, 64, 8, 4, seed=7)
    again = tiny_draws(names, 64, 8, 4, seed=7)
    assert list(draws) == names and all(torch.equal(draws[n], again[n]) for n in names)
    assert draws["latent_noise"].shape == (64, 4) and draws["mask_uniform"].shape == (64, 8)
    assert bool((draws["latent_noise"] < 0).any())  # N(0, 1)
    assert all(bool((draws[n] >= 0).all() and (draws[n] < 1).all()) for n in names[1:])  # U[0, 1)
    reordered = tiny_draws(list(reversed(names)), 64, 8, 4, seed=7)
    assert not torch.equal(reordered["latent_t"], draws["latent_t"])  # one generator, in the given order


def test_an_unknown_draw_name_is_named():
    with pytest.raises(KeyError, match="'latent_nois'"):
        tiny_draws(["latent_nois"], 2, 8, 4, seed=0)

"""cache_kwarg: the KV-cache argument name the installed transformers' forward takes, for plain and PEFT models."""

import inspect

import pytest
import torch

from genknowsub_fast.hf_compat import cache_kwarg


class OldStyle(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return input_ids


class NewStyle(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None):
        return input_ids


class Wrapper(torch.nn.Module):  # the shape of a PeftModel: forward(**kwargs), the model behind get_base_model()
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_base_model(self):
        return self.inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("cls, name", [(OldStyle, "past_key_values"), (NewStyle, "cache")])
def test_the_name_follows_the_forward_signature(cls, name):
    assert cache_kwarg(cls()) == name
    assert cache_kwarg(Wrapper(cls())) == name


def test_the_installed_phi3_takes_the_name_returned(phi3_setup):
    name = cache_kwarg(phi3_setup.base)
    assert name in inspect.signature(phi3_setup.base.forward).parameters

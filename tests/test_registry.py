"""The model registry's name lookup and its error messages."""

import pytest

from flaxrestore import models


def test_bare_family_with_one_variant_resolves():
    assert models.entry("snr").name == "snr"


def test_bare_family_with_several_variants_lists_them_all():
    with pytest.raises(KeyError) as e:
        models.entry("mprnet")
    msg = str(e.value)
    hint = msg.split("Did you mean", 1)[1].split("?", 1)[0]
    assert [n.strip() for n in hint.split(",")] == models.names("mprnet")
    assert "aecrnet" not in hint


def test_misspelt_name_suggests_close_names():
    with pytest.raises(KeyError, match=r"Did you mean .*restormer:deraining"):
        models.entry("restormer:deraning")

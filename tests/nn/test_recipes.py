"""parse_recipe: the one naming scheme (DESIGN.md convention 8).

The expected table below is written from the documentation (README.md recipe
list, recipes.py docstring, DESIGN.md), not read back from recipes.py, so a
change in what a name means fails here.
"""

import re

import pytest

from lowbit.nn import ActivationSpec, Recipe, parse_recipe
from lowbit.nn import recipes

from recipe_table import DOCUMENTED  # noqa: E402  (tests/nn is on sys.path)

README_RECIPES = (
    "a16w8-int8 a16w8-fp8 a16w4-int-g32 a16w4-int-g64 a16w4-int-g128 a16w3-int-g64 a16w2-int-g64 "
    "a8w8-fp8 a8w8-int8 a16w8-mxfp8 a16w6-mxfp6 a16w4-mxfp4 a16w4-nvfp4 a8w4-mxfp4 a8w4-fp8-mxfp4 a4w4-mxfp4 "
    "a4w4-nvfp4"
).split()


def test_examples_are_the_documented_recipes():
    assert list(recipes.EXAMPLES) == README_RECIPES
    assert set(DOCUMENTED) == set(recipes.EXAMPLES)


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_example_parses_to_documented_meaning(name):
    wfmt, wopts, afmt, aopts = DOCUMENTED[name]
    r = parse_recipe(name)
    assert isinstance(r, Recipe)
    assert r.name == name
    assert r.weight_fmt == wfmt
    assert r.weight_options == wopts
    assert isinstance(r.activation, ActivationSpec)
    assert r.activation.fmt == afmt
    assert r.activation.options == aopts
    assert r.method == "rtn"


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_rtn_suffix_is_the_default_method(name):
    plain, explicit = parse_recipe(name), parse_recipe(name + "-rtn")
    assert explicit.name == name + "-rtn"
    assert explicit.method == "rtn"
    assert (explicit.weight_fmt, explicit.weight_options) == (plain.weight_fmt, plain.weight_options)
    assert explicit.activation == plain.activation


def test_activation_spec_str():
    assert str(parse_recipe("a16w4-int-g128").activation) == "none"
    assert str(parse_recipe("a8w8-int8").activation) == "int8,granularity=token"
    assert str(parse_recipe("a4w4-nvfp4").activation) == "nvfp4"


def test_recipes_are_hashable_value_objects():
    # frozen dataclasses: equal names give equal recipes
    assert parse_recipe("a8w4-mxfp4") == parse_recipe("a8w4-mxfp4")
    with pytest.raises(Exception):
        parse_recipe("a8w4-mxfp4").weight_fmt = "int4"


def test_other_groups_and_int8_with_group():
    assert parse_recipe("a16w4-int-g16").weight_options == {"group_size": 16}
    assert parse_recipe("a16w2-int-g256").weight_fmt == "int2"
    r = parse_recipe("a16w8-int-g128")
    assert (r.weight_fmt, r.weight_options) == ("int8", {"group_size": 128})
    # 8-bit int weights with a group still take 8-bit int activations
    assert parse_recipe("a8w8-int-g128").activation.fmt == "int8"


BAD = [
    # name, regex the message must match
    ("a16w4-foo", r"unknown weight format 'foo'"),
    ("a16w4-int", r"4-bit integer weights need a group"),
    ("a16w3-int", r"3-bit integer weights need a group"),
    ("a16w2-int", r"2-bit integer weights need a group"),
    ("a16w4-mxfp8", r"mxfp8 weights have 8 bits, not 4"),
    ("a16w8-mxfp4", r"mxfp4 weights have 4 bits, not 8"),
    ("a16w4-fp8", r"fp8 weights have 8 bits, not 4"),
    ("a16w6-nvfp4", r"nvfp4 weights have 4 bits, not 6"),
    ("a8w4-int-g128", r"8-bit activations are not defined with int-g128 weights"),
    ("a4w4-int-g64", r"4-bit activations are not defined"),
    ("a4w8-fp8", r"4-bit activations are not defined with fp8 weights"),
    ("a8w4-nvfp4", r"8-bit activations are not defined with nvfp4 weights"),
    ("a16w4-mxfp4-hqq", r"-hqq optimises integer weights"),
    ("a16w4-nvfp4-hqq", r"-hqq optimises integer weights"),
    ("a16w4-int-g64-smooth", r"-smooth \(SmoothQuant\) only applies to a8w8-\* recipes"),
    ("a8w4-mxfp4-smooth", r"only applies to a8w8-\* recipes"),
    ("a16w8-fp8-awq", r"-awq applies to integer and FP4"),
    ("a16w6-mxfp6-awq", r"-awq applies to integer and FP4"),
    ("a16w4-mxfp4-gptq-rot", r"the transform 'rot' must come before the quantizer 'gptq'"),
    ("a16w4-int-g64-gptq-awq", r"the transform 'awq' must come before the quantizer 'gptq'"),
    ("a16w4-int-g64-hqq-gptq", r"two quantizers"),
    ("a16w4-int-g64-rtn-rtn", r"two quantizers"),
    ("a16w4-int-g64-awq-rot", r"two transforms"),
    ("a16w4-mxfp4-rot32", r"-rot already means block 32"),
    ("a16w4-mxfp4-rot48", r"power of two"),
    ("a16w4-mxfp4-rot1", r"power of two"),
    ("a16w4-hqq", r"unknown weight format 'hqq'"),
    ("a16w4-int-g128-foo", r"unknown weight format 'int-g128-foo'"),
    ("a32w4-mxfp4", r"does not follow the naming scheme"),
    ("a16w5-int-g64", r"does not follow the naming scheme"),
    ("A16W4-MXFP4", r"does not follow the naming scheme"),
    ("mxfp4", r"does not follow the naming scheme"),
    ("", r"does not follow the naming scheme"),
    ("a16w4-mxfp4 ", r"does not follow the naming scheme"),
]


@pytest.mark.parametrize("name,why", BAD)
def test_bad_names_raise_clear_value_error(name, why):
    with pytest.raises(ValueError) as e:
        parse_recipe(name)
    msg = str(e.value)
    assert re.search(why, msg), msg
    assert repr(name) in msg  # names the offending recipe
    assert "a16w4-int-g128" in msg or "a16w8-int8" in msg  # shows valid examples


@pytest.mark.parametrize("bad", [None, 4, b"a16w4-mxfp4"])
def test_non_string_raises_value_error(bad):
    with pytest.raises(ValueError, match="naming scheme"):
        parse_recipe(bad)


def test_group_zero_is_rejected_by_the_parser():
    with pytest.raises(ValueError, match="group"):
        parse_recipe("a16w4-int-g0")


# method suffixes, from the recipes docstring / README: (quantizer, transform, rotation block, needs data)
METHOD_RECIPES = {
    "a16w4-int-g64-hqq": ("hqq", None, None, False),
    "a16w8-int8-hqq": ("hqq", None, None, False),
    "a16w4-int-g64-gptq": ("gptq", None, None, True),
    "a16w4-int-g64-awq": ("rtn", "awq", None, True),
    "a16w4-int-g64-awq-gptq": ("gptq", "awq", None, True),
    "a16w4-int-g64-awq-hqq": ("hqq", "awq", None, True),
    "a16w4-mxfp4-awq": ("rtn", "awq", None, True),
    "a16w4-nvfp4-gptq": ("gptq", None, None, True),
    "a16w4-mxfp4-rot": ("rtn", "rot", 32, False),
    "a16w4-mxfp4-rot128": ("rtn", "rot", 128, False),
    "a16w4-mxfp4-rot-gptq": ("gptq", "rot", 32, True),
    "a4w4-nvfp4-rot": ("rtn", "rot", 32, False),
    "a8w8-int8-smooth": ("rtn", "smooth", None, True),
    "a8w8-fp8-smooth-gptq": ("gptq", "smooth", None, True),
    "a16w4-int-g64-rot-rtn": ("rtn", "rot", 32, False),
}


@pytest.mark.parametrize("name", list(METHOD_RECIPES))
def test_method_suffixes(name):
    quantizer, transform, block, needs = METHOD_RECIPES[name]
    r = parse_recipe(name)
    assert (r.quantizer, r.transform, r.rotation_block, r.needs_calibration) == (quantizer, transform, block, needs)
    assert r.name == name
    # the format part is the same as without the methods
    body = name
    for suffix in ("-rtn", "-hqq", "-gptq", "-awq", "-smooth", "-rot128", "-rot"):
        body = body.replace(suffix, "")
    base = parse_recipe(body)
    assert (r.weight_fmt, r.weight_options, r.activation) == (base.weight_fmt, base.weight_options, base.activation)
    assert base.method == "rtn" and base.transform is None and not base.needs_calibration


def test_method_string_is_the_suffix_as_written():
    assert parse_recipe("a16w4-mxfp4-rot-gptq").method == "rot-gptq"
    assert parse_recipe("a16w4-int-g64-hqq").method == "hqq"
    assert parse_recipe("a16w4-int-g64").method == "rtn"

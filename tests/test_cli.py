"""The command line: `lowbit formats`, `--help`, and errors that name the fix."""

import subprocess
import sys

import pytest

from lowbit.cli import main
from lowbit.formats import FORMATS


def test_formats_lists_all_thirteen(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:] if line.strip() and not line.startswith("bits/weight")}
    assert sorted(rows) == sorted(FORMATS) and len(rows) == 13
    assert rows["mxfp4"][1] == "4" and "4.250" in rows["mxfp4"]
    assert rows["nvfp4"][1] == "4" and "4.500" in rows["nvfp4"]
    assert rows["int4"][1] == "4" and "4.250" in rows["int4"]
    assert rows["mxfp6_e2m3"][1] == "6" and "6.250" in rows["mxfp6_e2m3"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("formats", "demo", "eval"):
        assert command in out


def test_bad_recipe_is_a_clear_error(capsys):
    assert main(["eval", "--recipe", "a16w4-int"]) == 2
    err = capsys.readouterr().err
    assert "a16w4-int" in err and "need a group" in err and "a16w4-int-g128" in err


def test_python_dash_m_runs():
    out = subprocess.run([sys.executable, "-m", "lowbit", "formats"], capture_output=True, text=True, check=True).stdout
    assert "nvfp4" in out and "mxint8" in out


@pytest.mark.parametrize("args,why", [
    (["--recipe", "a16w4-int-g64-gptq", "--method-options", "{bad"], "must be JSON"),
    (["--recipe", "a16w4-int-g64-gptq", "--method-options", '{"gptq": {"damp": 1}}'], "unknown option"),
    (["--recipe", "a16w4-int-g64-gptq", "--calibration-seqs", "0"], "--calibration-seqs"),
    (["--recipe", "a16w4-mxfp4-hqq"], "-hqq optimises integer weights"),
])
def test_eval_method_arguments_fail_before_loading_a_model(args, why, capsys):
    assert main(["eval", *args]) == 2
    assert why in capsys.readouterr().err

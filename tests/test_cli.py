import subprocess
import sys

import pytest

from simtomo.cli import main


def test_simulate_writes_the_series(tmp_path, capsys):
    assert main(["-q", "simulate", "--preset", "tiny", "--out", str(tmp_path), "--seed", "3", "--set", "beads.count=4"]) == 0
    for suffix in ("mrc", "rawtlt", "truth.json", "config.toml"):
        assert (tmp_path / f"tiny.{suffix}").is_file()
    assert "beads.count" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "beads.cont=3"], "unknown key beads.cont"),
        (["--set", "tilt.total_dose_e_per_A2=-1"], "expected a dose > 0 and <= 1e6, got -1.0"),
        (["--config", "missing.toml"], "missing.toml: cannot read config file"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, capsys, args, message):
    assert main(["simulate", "--preset", "tiny", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "tiny.mrc").exists()


def test_unknown_preset_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--preset", "huge", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_help_documents_parameters_with_units(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "tilt.total_dose_e_per_A2 = 120.0 [e/Å²]" in out
    assert "misalignment.backlash_nm = 48.0 [nm]" in out


def test_console_script_reports_progress(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simtomo.cli", "simulate", "--preset", "tiny", "--out", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    assert "views 41/41" in result.stderr and "simulated tiny" in result.stderr

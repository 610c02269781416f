"""The ldm command line: help lists the commands; bad input is one line and exit code 2."""
import subprocess
import sys

from ldm.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "config" in out and "samplers" in out


def test_config_prints_validated_yaml(capsys):
    assert main(["config", "tiny", "sampler.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "name: euler" in out


def test_config_bad_key_is_one_line_and_exit_2(capsys):
    assert main(["config", "tiny", "sampler.stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampler.stepz" in err[0] and "Did you mean 'steps'" in err[0]


def test_config_bad_sampler_lists_allowed(capsys):
    assert main(["config", "tiny", "sampler.name=eulr"]) == 2
    err = capsys.readouterr().err
    assert "eulr" in err and "dpmpp_2m" in err and "euler_ancestral" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ldm.cli", "samplers"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert set(names) >= {"ddpm", "ddim", "plms", "lms", "euler", "euler_ancestral", "heun", "dpm2", "dpmpp_2m",
                          "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"}

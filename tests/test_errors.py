"""errors.py: every kind derives from AirlabError and its builtin, carries its exit code, and the
command line maps it to that code with one line on stderr (the traceback only with --debug)."""

import sys

import pytest

from airlab import cli, errors

# the command line's contract: 2 for a wrong invocation, 1 for inputs and failures during the work
EXIT_CODES = {
    "InputError": (1, ValueError),
    "RegistrationError": (1, ValueError),
    "ConfigError": (2, ValueError),
    "ImageIOError": (1, RuntimeError),
    "TransformIOError": (1, RuntimeError),
    "OutputExistsError": (2, FileExistsError),
    "ManifestError": (2, ValueError),
    "GroupError": (2, ValueError),
}


def test_every_kind_is_listed_here():
    assert set(errors.__all__) == {"AirlabError", *EXIT_CODES}
    assert issubclass(errors.RegistrationError, errors.InputError)  # callers catching InputError get both


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_each_kind_has_its_base_builtin_and_exit_code(name):
    kind = getattr(errors, name)
    code, builtin = EXIT_CODES[name]
    assert issubclass(kind, errors.AirlabError) and issubclass(kind, builtin)
    assert kind.exit_code == code


def _run_raising(monkeypatch, capsys, exc, *flags):
    """``cli.run`` as the console entry point calls it, with a command that raises ``exc``."""

    def invoke(ctx):
        raise exc

    monkeypatch.setattr(cli.main, "invoke", invoke)
    monkeypatch.setattr(sys, "argv", ["airlab", *flags, "demo"])
    with pytest.raises(SystemExit) as stop:
        cli.run()
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_the_command_line_maps_each_kind_to_its_exit_code_and_one_line(name, monkeypatch, capsys):
    message = f"{name} says\n  what went   wrong"
    code, err = _run_raising(monkeypatch, capsys, getattr(errors, name)(message))
    assert code == EXIT_CODES[name][0]
    assert err == f"airlab: error: {name} says what went wrong\n"


def test_debug_lets_the_error_through(monkeypatch):
    def invoke(ctx):
        raise errors.ConfigError("bad key")

    monkeypatch.setattr(cli.main, "invoke", invoke)
    monkeypatch.setattr(sys, "argv", ["airlab", "--debug", "demo"])
    with pytest.raises(errors.ConfigError, match="bad key"):
        cli.run()


def test_an_unexpected_error_exits_1_and_out_of_memory_says_what_to_try(monkeypatch, capsys):
    assert _run_raising(monkeypatch, capsys, KeyError("x")) == (1, "airlab: error: 'x'\n")
    code, err = _run_raising(monkeypatch, capsys, MemoryError())
    assert code == 1 and err.startswith("airlab: error: out of memory (MemoryError); try --device cpu")

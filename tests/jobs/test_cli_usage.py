"""The `memorag` command line as users meet it: usage errors print the usage line and the message and exit 2 with
no traceback, for every command; library errors print `error: ...`; every job is in one command tree whose help
lists all of its options, defined once and shared with `python -m jobs.memorize` / `python -m jobs.summarize`."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import app, main
from jobs.options import MemorizeJobFlags, SummarizeJobFlags

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Help and error panels as wide as their content (rich wraps at the terminal width)."""
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("TERMINAL_WIDTH", "250")


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


STORE = "/tmp/memorag-no-such-store-for-usage-tests"
USAGE_ERRORS = [
    # (argv, the message part, the command named in the usage line)
    (["ask", "x", "--bogus"], "No such option: --bogus", "ask"),
    (["ask", "x", "--collection", "c", "--store", STORE, "--top-k", "many"], "Invalid value for '--top-k'", "ask"),
    (["ask", "x", "--collection", "c", "--store", STORE, "--task", "poem"], "Invalid value for '--task'", "ask"),
    (["ask", "x", "--collection", "c"], "--collection needs --store URL", "ask"),
    (["ask", "x"], "give either --collection", "ask"),
    (["memorize", "book.txt", "--bogus"], "No such option: --bogus", "memorize"),
    (["memorize"], "give PATH --save-dir DIR", "memorize"),
    (["memorize", "book.txt"], "needs --save-dir", "memorize"),
    (["memorize", "book.txt", "-o", "b", "--ratio", "four"], "Invalid value for '--ratio'", "memorize"),
    (["memorize", "--corpus", "c.jsonl", "--collection", "x", "--format", "docx"], "Invalid value for '--format'",
     "memorize"),
    (["memorize", "--corpus", "c.jsonl", "--collection", "x", "--actors", "0"], "Invalid value for '--actors'",
     "memorize"),
    (["memorize", "book.txt", "-o", "b", "--actors", "2"], "--actors: corpus job option", "memorize"),
    (["memorize", "book.txt", "--store", STORE], "--store: corpus job option", "memorize"),
    (["memorize", "--corpus", "c.jsonl", "--window", "64"], "--window: bundle option", "memorize"),
    (["summarize", "--bogus"], "No such option: --bogus", "summarize"),
    (["summarize", "--collection", "c", "--fan-in", "two"], "Invalid value for '--fan-in'", "summarize"),
    (["evaluate", "--bogus"], "No such option: --bogus", "evaluate"),
    (["evaluate", "--dataset", "d.jsonl", "--hits", "x"], "Invalid value for '--hits'", "evaluate"),
    (["evaluate"], "--dataset is required", "evaluate"),
    (["evaluate", "--merge"], "--merge needs the predictions.json files", "evaluate"),
    (["serve"], "Missing option '--store'", "serve"),
    (["serve", "--store", STORE, "--port", "http"], "Invalid value for '--port'", "serve"),
    (["keys", "create", "--store", STORE], "Missing option '--collection'", "keys create"),
    (["keys", "revoke", "--store", STORE, "--collection", "c"], "Missing argument 'KEY_ID'", "keys revoke"),
    (["keys", "list", "--bogus"], "No such option: --bogus", "keys list"),
    (["collections", "--bogus"], "No such option: --bogus", "collections"),
    (["collections"], "--store URL is required", "collections"),
    (["collections", "show", "--store", STORE], "Missing argument 'NAME'", "collections show"),
    (["gc"], "--store URL is required", "gc"),
    (["gc", "--store", STORE, "--keep-last", "0"], "Invalid value for '--keep-last'", "gc"),
    (["nosuchcommand"], "No such command 'nosuchcommand'", ""),
]


@pytest.mark.parametrize("argv,message,command", USAGE_ERRORS, ids=[" ".join(a) for a, _, _ in USAGE_ERRORS])
def test_usage_errors_print_usage_and_message_and_exit_2(capsys, monkeypatch, argv, message, command):
    monkeypatch.delenv("MEMORAG_STORE", raising=False)
    code, out, err = run(capsys, argv)
    assert code == 2, (out, err)
    assert message in err, err
    assert f"Usage: memorag {command}".rstrip() in err and "--help' for help" in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("argv,message", [
    (["collections", "--store", "nosuch://bucket/x"], "error: store URL 'nosuch://bucket/x': Protocol not known"),
    (["collections", "--store", "s3://"], "error: S3 URL 's3://' names no bucket"),
    (["collections", "--store", STORE], f"error: store {STORE} does not exist"),
    (["gc", "--store", "s3://", "--dry-run"], "error: S3 URL 's3://' names no bucket"),
    (["collections", "show", "facts", "--store", "nosuch://b"], "error: store URL 'nosuch://b'"),
    (["ask", "x", "--collection", "c", "--store", "nosuch://b"], "error: store URL 'nosuch://b'"),
    (["keys", "list", "--store", "nosuch://b", "--collection", "c"], "error: store URL 'nosuch://b'"),
])
def test_bad_store_urls_are_errors_of_the_library_not_tracebacks(capsys, argv, message):
    code, out, err = run(capsys, argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_help_lists_every_job_and_every_option_of_the_corpus_job(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    for command in ("memorize", "ask", "summarize", "evaluate", "serve", "keys", "collections", "gc"):
        assert re.search(rf"│ {command}\s", out), command
    code, out, _ = run(capsys, ["memorize", "--help"])
    assert code == 0
    for f in dataclasses.fields(MemorizeJobFlags):  # the corpus job's options, all of them
        option = "--" + f.name.replace("_", "-").replace("corpus-format", "format")
        assert option in out, option
    assert "--save-dir" in out and "Corpus job (Ray)" in out and "Bundle (one process)" in out
    code, out, _ = run(capsys, ["summarize", "--help"])
    for f in dataclasses.fields(SummarizeJobFlags):
        option = "--" + f.name.replace("_", "-").replace("collection-version", "version")
        assert option in out, option
    code, out, _ = run(capsys, ["evaluate", "--help"])
    assert "--modes" in out and "--share-clues" in out and "--merge" in out


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_job_modules_take_the_same_options_as_memorag():
    """`python -m jobs.memorize` / `jobs.summarize` (what `ray job submit -- ...` runs) parse with the very options
    of `memorag memorize` / `memorag summarize`: same help lines, and a usage error without a traceback."""
    job = _python("-m", "jobs.memorize", "--help")
    cli = _python("-m", "jobs.cli", "memorize", "--help")
    assert job.returncode == 0 == cli.returncode

    def option_lines(text: str) -> set[str]:
        return {ln[2:].split()[0] for ln in text.splitlines() if ln.startswith("│ --")}

    job_options, cli_options = option_lines(job.stdout), option_lines(cli.stdout)
    assert {"--corpus", "--collection", "--store", "--actors", "--pin-cpus", "--memory-model,--model"} <= job_options
    assert job_options <= cli_options  # memorag memorize adds only the bundle's options
    assert cli_options - job_options == {"--save-dir", "--window", "--positions", "--chunk-size"}
    assert "--storage-dtype" in job_options  # one option for the job's units and a bundle's memory
    summarize = _python("-m", "jobs.summarize", "--help")
    assert option_lines(summarize.stdout) == option_lines(_python("-m", "jobs.cli", "summarize", "--help").stdout)
    bad = _python("-m", "jobs.memorize", "--corpus", "c.jsonl", "--shards", "x")
    assert bad.returncode == 2 and "Invalid value for '--shards'" in bad.stderr
    assert "Traceback" not in bad.stderr and "Usage: python -m jobs.memorize" in bad.stderr
    bad = _python("-m", "jobs.cli", "ask", "x", "--bogus")
    assert bad.returncode == 2 and "No such option: --bogus" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_command_list_matches_memorag_help():
    """The README's command list names exactly the commands of `memorag --help`."""
    from typer.main import get_command

    commands = set(get_command(app).commands)
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- commands -->")[1].split("<!-- /commands -->")[0]
    listed = set(re.findall(r"^memorag ([a-z]+)", block, flags=re.M))
    assert listed == commands, (listed ^ commands)
    assert "--install-completion" in readme


def test_shell_completion_is_typers_own(capsys, monkeypatch):
    """`memorag --show-completion bash` prints typer's completion script for `memorag`."""
    # typer's switch for naming the shell instead of detecting it from the process tree (which varies under CI)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    code, out, err = run(capsys, ["--show-completion", "bash"])
    assert code == 0 and "_MEMORAG_COMPLETE" in out and "complete " in out, err
    code, out, err = run(capsys, ["--show-completion", "zsh"])
    assert code == 0 and "compdef" in out and "_MEMORAG_COMPLETE" in out, err

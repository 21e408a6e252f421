"""The TOML schema checks shared by job files, lab files and VM inventories."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.errors import ConfigError
from surepoint.jobs.job_file import parse_job
from surepoint.tomlfile import check_known, one_of, positive_seconds, read_toml


def test_read_toml_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="job file .*missing.toml does not exist"):
        read_toml(str(tmp_path / "missing.toml"), "job file")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="lab file .*bad.toml is not valid TOML"):
        read_toml(str(bad), "lab file")
    assert ConfigError.exit_code == 2


def test_the_checks():
    check_known({"a": 1}, {"a", "b"}, "x.toml")
    with pytest.raises(ConfigError, match=r"^x.toml: unknown setting\(s\) c; known: a, b$"):
        check_known({"a": 1, "c": 2}, {"b", "a"}, "x.toml")
    with pytest.raises(ConfigError, match=r"for a port test \(known: name, port\)"):
        check_known({"z": 1}, ["name", "port"], "lab", what="a port test")
    assert positive_seconds(3, "`t`") == 3.0
    for bad in (0, -1, True, "60", None):
        with pytest.raises(ValueError, match="`t` must be a positive number of seconds"):
            positive_seconds(bad, "`t`")
    assert one_of("try", ("try", "require"), "`fallback`") == "try"
    with pytest.raises(ValueError, match="`fallback` must be one of try, require, not 'maybe'"):
        one_of("maybe", ("try", "require"), "`fallback`")


def test_a_job_file_says_what_is_wrong_where():
    with pytest.raises(ConfigError, match=r"^j.toml: `logs` must be one of"):
        parse_job({"sources": ["/a.img"], "logs": "sometimes"}, "j.toml")
    with pytest.raises(ConfigError, match=r"^j.toml: `freeze_timeout` must be a positive number"):
        parse_job({"sources": ["/a.img"], "freeze_timeout": 0}, "j.toml")
    with pytest.raises(ConfigError, match=r"^j.toml: unknown setting\(s\) sorces"):
        parse_job({"sorces": ["/a.img"]}, "j.toml")
    job = parse_job({"sources": ["/srv/a.img"], "freeze_timeout": 5}, "j.toml")
    assert (job.name, job.freeze_timeout, job.fallback, job.logs) == ("a.img", 5.0, "try", "truncate")

"""Secret, Credentials and the credential sources (systemd credentials, chained, static)."""

from __future__ import annotations

import copy
import pickle

import pytest

from tray_proxy.relay.secrets import (
    ChainedCredentialSource,
    Credentials,
    Secret,
    StaticCredentialSource,
    SystemdCredentialSource,
)

PASSWORD = "correct horse battery staple"


def test_secret_is_redacted_everywhere_but_reveal():
    secret = Secret(PASSWORD)
    creds = Credentials("alice", secret)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr(creds), str(creds)):
        assert PASSWORD not in text
        assert "***" in text
    assert secret.reveal() == PASSWORD
    assert "alice" in repr(creds)


def test_secret_cannot_be_pickled_or_copied_by_accident():
    secret = Secret(PASSWORD)
    for attempt in (
        lambda: pickle.dumps(secret),
        lambda: pickle.dumps(Credentials("alice", secret)),
        lambda: copy.deepcopy(secret),
    ):
        with pytest.raises(TypeError) as info:
            attempt()
        assert PASSWORD not in str(info.value)


def test_secret_equality_and_hash():
    assert Secret("a") == Secret("a") and hash(Secret("a")) == hash(Secret("a"))
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"  # never equal to the bare string


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("s3cret\n", "s3cret"),
        ("s3cret", "s3cret"),
        ("s3cret\r\n", "s3cret"),
        ("s3cret\n\n", "s3cret\n"),  # only one trailing newline is not part of it
        (" spaced \n", " spaced "),
    ],
)
def test_systemd_source_reads_the_file_named_after_the_upstream(tmp_path, content, expected):
    (tmp_path / "corp").write_text(content, encoding="utf-8")
    found = SystemdCredentialSource(tmp_path).get("corp", "alice")
    assert found is not None
    assert found.username == "alice"
    assert found.password.reveal() == expected


def test_systemd_source_uses_credentials_directory(tmp_path, monkeypatch):
    (tmp_path / "corp").write_text("pw\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    found = SystemdCredentialSource().get("corp", "alice")
    assert found is not None and found.password.reveal() == "pw"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "")
    assert SystemdCredentialSource().get("corp", "alice") is None
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert SystemdCredentialSource().get("corp", "alice") is None


def test_systemd_source_needs_a_username(tmp_path):
    (tmp_path / "corp").write_text("pw", encoding="utf-8")
    assert SystemdCredentialSource(tmp_path).get("corp", None) is None


@pytest.mark.parametrize("name", ["", ".", "..", "../corp", "a/b", "/etc/shadow", "sub/"])
def test_systemd_source_rejects_path_like_names(tmp_path, name):
    inner = tmp_path / "creds"
    inner.mkdir()
    (tmp_path / "corp").write_text("outside", encoding="utf-8")
    (inner / "a").mkdir()
    (inner / "a" / "b").write_text("nested", encoding="utf-8")
    assert SystemdCredentialSource(inner).get(name, "alice") is None


def test_systemd_source_missing_unreadable_or_not_text(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    source = SystemdCredentialSource(tmp_path)
    assert source.get("missing", "alice") is None
    assert source.get("dir", "alice") is None
    assert source.get("binary", "alice") is None


def test_chained_source_first_match_wins(tmp_path):
    (tmp_path / "corp").write_text("from-file", encoding="utf-8")
    static = StaticCredentialSource({"other": Credentials("bob", Secret("from-memory"))})
    chain = ChainedCredentialSource(SystemdCredentialSource(tmp_path), static)
    corp = chain.get("corp", "alice")
    other = chain.get("other", "bob")
    assert corp is not None and corp.password.reveal() == "from-file"
    assert other is not None and other.password.reveal() == "from-memory"
    assert chain.get("nobody", "x") is None


def test_static_source_set_and_get():
    source = StaticCredentialSource()
    assert source.get("corp", "alice") is None
    source.set("corp", Credentials("alice", Secret("pw")))
    found = source.get("corp", None)
    assert found is not None and found.password == Secret("pw")


def test_systemd_source_rereads_a_changed_file_and_forgets_a_removed_one(tmp_path):
    source = SystemdCredentialSource(tmp_path)
    (tmp_path / "corp").write_text("first\n")
    assert source.get("corp", "alice").password.reveal() == "first"
    assert source.get("corp", "alice").password.reveal() == "first"  # served from the cache
    (tmp_path / "corp").write_text("second-and-longer\n")
    assert source.get("corp", "alice").password.reveal() == "second-and-longer"
    (tmp_path / "corp").unlink()
    assert source.get("corp", "alice") is None

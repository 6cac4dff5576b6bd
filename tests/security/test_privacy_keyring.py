"""The keyring file is written through a fresh, private, randomly named file: nothing
planted in its directory (a symlink at the old fixed `.tmp` name, or at any name the
writer might pick) is followed, truncated or written through."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import privacy.keys
from privacy.keys import Keyring, embedded_keyring_path, load_keyring, parse_keyring, write_keyring
from tomlsections.reader import ConfigError

VICTIM_TEXT = b"the file a planted symlink points at\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(VICTIM_TEXT)
    return path


def keyring_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    return directory


def test_a_symlink_at_the_old_fixed_tmp_name_is_left_alone(tmp_path: Path, victim: Path) -> None:
    path = keyring_dir(tmp_path) / "keyring.json"
    planted = path.with_suffix(".tmp")  # where the writer used to write
    planted.symlink_to(victim)
    keyring = Keyring.generate()

    write_keyring(keyring, path)

    assert victim.read_bytes() == VICTIM_TEXT
    assert planted.is_symlink()
    assert parse_keyring(path.read_bytes(), str(path)) == keyring
    assert not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_at_the_name_the_writer_picks_is_not_followed(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even an attacker who guessed the random name gains nothing: the file is created
    exclusively (O_EXCL|O_NOFOLLOW), so the writer moves on to another name."""
    path = keyring_dir(tmp_path) / "keyring.json"
    names: Iterator[str] = iter(["guessed", "fresh"])
    monkeypatch.setattr(privacy.keys, "_temp_suffix", lambda: next(names))
    planted = path.parent / ".keyring.json.guessed.tmp"
    planted.symlink_to(victim)
    keyring = Keyring.generate().rotated()

    write_keyring(keyring, path)

    assert victim.read_bytes() == VICTIM_TEXT
    assert planted.is_symlink(), "the planted link is neither followed nor replaced"
    assert parse_keyring(path.read_bytes(), str(path)) == keyring
    # Nothing of the write is left behind but the keyring and what was planted.
    assert sorted(p.name for p in path.parent.iterdir()) == [planted.name, "keyring.json"]


def test_a_directory_full_of_planted_names_makes_the_write_fail_not_follow(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = keyring_dir(tmp_path) / "keyring.json"
    monkeypatch.setattr(privacy.keys, "_temp_suffix", lambda: "guessed")
    (path.parent / ".keyring.json.guessed.tmp").symlink_to(victim)
    path.write_bytes(b"old keyring")

    with pytest.raises(FileExistsError):
        write_keyring(Keyring.generate(), path)

    assert victim.read_bytes() == VICTIM_TEXT
    assert path.read_bytes() == b"old keyring", "a failed write leaves the old keyring"


def test_the_first_keyring_is_generated_privately_and_reused(tmp_path: Path) -> None:
    first = load_keyring("", tmp_path)
    path = embedded_keyring_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring("", tmp_path) == first
    assert [p.name for p in path.parent.iterdir()] == ["keyring.json"]


def test_a_dangling_symlink_at_the_embedded_keyring_is_refused_not_written_through(
    tmp_path: Path, victim: Path
) -> None:
    target = victim.parent / "not-yet-there.json"
    path = embedded_keyring_path(tmp_path)
    path.parent.mkdir(mode=0o700)
    path.symlink_to(target)

    with pytest.raises(ConfigError, match="symbolic link"):
        load_keyring("", tmp_path)

    assert not target.exists()
    assert os.path.islink(path)

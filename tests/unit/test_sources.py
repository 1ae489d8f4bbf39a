"""kmod_build sources: kinds, options, identities, and preparing a .run or a tree (local, tarball, URL)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import sources
from ansible_collections.modulus.kmods.plugins.module_utils.sources import BuildError, InputError


def test_source_kind(tmp_path: Path) -> None:
    assert sources.source_kind("nvidia", None, None) == "url"
    assert sources.source_kind("nvidia", "https://mirror/x.run", None) == "url"
    assert sources.source_kind("generic", "https://github.com/x/y.git", None) == "git"
    assert sources.source_kind("generic", "https://h/x.tar.gz", "v1") == "git"
    assert sources.source_kind("generic", str(tmp_path), None) == "dir"
    t = tmp_path / "s.tar.gz"
    t.write_bytes(b"x")
    assert sources.source_kind("generic", str(t), None) == "file"
    with pytest.raises(InputError, match="source is required"):
        sources.source_kind("generic", None, None)
    with pytest.raises(InputError, match="absolute path"):
        sources.source_kind("generic", "relative/dir", None)
    with pytest.raises(InputError, match="does not exist"):
        sources.source_kind("nvidia", str(tmp_path / "missing.run"), None)
    with pytest.raises(InputError, match="directory"):
        sources.source_kind("nvidia", str(tmp_path), None)
    with pytest.raises(InputError, match="scheme"):
        sources.source_kind("nvidia", "ftp://h/x.run", None)
    z = tmp_path / "s.zip"
    z.write_bytes(b"PK")
    with pytest.raises(InputError, match="not a tarball"):
        sources.source_kind("generic", str(z), None)


def test_options() -> None:
    h = "ab" * 32
    assert sources.validate_sha256(h.upper()) == h
    assert sources.validate_sha256("sha256:" + h) == h
    assert sources.validate_sha256(None) is None and sources.validate_sha256("") is None
    for bad in ("md5:abc", h + "\n", h[:-1]):
        with pytest.raises(InputError, match="checksum="):
            sources.validate_sha256(bad)
    assert sources.validate_subdir("src/kmod/") == "src/kmod" and sources.validate_subdir(None) == ""
    for bad in ("/abs", "../up", "a/../../b", "src\n"):
        with pytest.raises(InputError, match="subdir="):
            sources.validate_subdir(bad)
    assert sources.validate_git_ref("v1.2/x") == "v1.2/x" and sources.validate_git_ref(None) is None
    for bad in ("v1\n", "-x", "a b"):
        with pytest.raises(InputError, match="git_ref="):
            sources.validate_git_ref(bad)


def test_identities(tmp_path: Path) -> None:
    f = tmp_path / "s.tar.gz"
    f.write_bytes(b"tarball")
    digest = hashlib.sha256(b"tarball").hexdigest()
    assert sources.source_identity("file", str(f), None, None) == "sha256:" + digest
    assert sources.source_identity("file", str(f), digest, None) == "sha256:" + digest
    with pytest.raises(InputError, match="does not match"):
        sources.source_identity("file", str(f), "00" * 32, None)
    assert sources.source_identity("url", "https://h/x", None, None) == "url:https://h/x"
    assert sources.source_identity("url", "https://h/x", digest, None) == "sha256:" + digest
    assert sources.source_identity("git", "https://h/x.git", None, "v1") == "git:https://h/x.git@v1"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.c").write_text("int x;\n")
    first = sources.source_identity("dir", str(tree), None, None)
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref")
    assert sources.source_identity("dir", str(tree), None, None) == first  # .git is not the source
    (tree / "a.c").chmod(0o755)
    assert sources.source_identity("dir", str(tree), None, None) != first


def _tarball(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x", mode: str = "w:gz") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for ti in members:
            if ti.isfile():
                ti.size = len(data)
            t.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    path.write_bytes(buf.getvalue())
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = mode
    ti.mtime = 1_600_000_000
    return ti


def _prepare(tmp_path: Path, kind: str, source: str, checksum: str | None = None) -> tuple[str, str]:
    for d in ("in", "work"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    return sources.prepare_tree(kind, source, "", str(tmp_path / "in"), str(tmp_path / "work"), checksum, None,
                                30.0, True, lambda _m: None)


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2", "w"])
def test_tarball_source_is_unpacked(tmp_path: Path, mode: str) -> None:
    arc = _tarball(tmp_path / "p.tar", [_member("./proj-1.0/", tarfile.DIRTYPE, mode=0o755),
                                        _member("./proj-1.0/Kbuild"), _member("./proj-1.0/gen.sh", mode=0o700)], mode=mode)
    src, digest = _prepare(tmp_path / "b", "file", str(arc))
    assert digest == hashlib.sha256(arc.read_bytes()).hexdigest()
    assert src == str(tmp_path / "b/work/src") and (Path(src) / "Kbuild").read_bytes() == b"x"
    assert (Path(src) / "gen.sh").stat().st_mode & 0o777 == 0o755
    assert (Path(src) / "Kbuild").stat().st_mtime == 1_600_000_000  # make sees the upstream times


def test_tarball_source_from_a_url_with_checksum(tmp_path: Path) -> None:
    arc = _tarball(tmp_path / "p.tar.gz", [_member("proj/Kbuild")])
    digest = hashlib.sha256(arc.read_bytes()).hexdigest()
    src, got = _prepare(tmp_path / "b", "url", arc.as_uri(), digest)
    assert got == digest and (Path(src) / "Kbuild").exists()
    with pytest.raises(InputError, match="does not match"):
        _prepare(tmp_path / "c", "url", arc.as_uri(), "00" * 32)
    with pytest.raises(BuildError, match="download of"):
        _prepare(tmp_path / "d", "url", (tmp_path / "missing.tar.gz").as_uri())


@pytest.mark.parametrize("name,kind,link", [("../evil.c", tarfile.REGTYPE, ""), ("/etc/evil", tarfile.REGTYPE, ""),
                                            ("src/l", tarfile.SYMTYPE, "../../etc/passwd"),
                                            ("src/dev", tarfile.CHRTYPE, "")])
def test_tarball_source_refuses_escapes(tmp_path: Path, name: str, kind: bytes, link: str) -> None:
    arc = _tarball(tmp_path / "a.tar.gz", [_member(name, kind, link)])
    with pytest.raises(BuildError, match="source tarball"):
        _prepare(tmp_path / "b", "file", str(arc))
    assert not (tmp_path / "evil.c").exists() and not (tmp_path / "b/evil.c").exists()


def test_unreadable_tarball_is_a_build_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    with pytest.raises(BuildError, match="not a readable tarball"):
        _prepare(tmp_path / "b", "file", str(bad))


def test_directory_source_is_copied_without_git(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / ".git").mkdir(parents=True)
    (tree / "Kbuild").write_text("obj-m += x.o\n")
    (tree / "link").symlink_to("Kbuild")
    ident = sources.source_identity("dir", str(tree), None, None)
    for d in ("in", "work"):
        (tmp_path / "b" / d).mkdir(parents=True)
    src, digest = sources.prepare_tree("dir", str(tree), ident, str(tmp_path / "b/in"), str(tmp_path / "b/work"),
                                       None, None, 30.0, True, lambda _m: None)
    assert "tree:" + digest == ident and not (Path(src) / ".git").exists() and (Path(src) / "link").is_symlink()


def test_prepare_run(tmp_path: Path) -> None:
    run = tmp_path / "NVIDIA.run"
    run.write_bytes(b"#!/bin/sh\necho stub\n")
    (tmp_path / "in").mkdir()
    path, digest = sources.prepare_run("file", str(run), str(tmp_path / "in"), None, 30.0, True, lambda _m: None)
    assert Path(path).read_bytes() == run.read_bytes() and digest == hashlib.sha256(run.read_bytes()).hexdigest()
    (tmp_path / "in2").mkdir()
    with pytest.raises(InputError, match="does not match the downloaded"):
        sources.prepare_run("url", run.as_uri(), str(tmp_path / "in2"), "00" * 32, 30.0, True, lambda _m: None)
    not_run = tmp_path / "x.run"
    not_run.write_bytes(b"MZ....")
    (tmp_path / "in3").mkdir()
    with pytest.raises(BuildError, match="not a self-extracting"):
        sources.prepare_run("file", str(not_run), str(tmp_path / "in3"), None, 30.0, True, lambda _m: None)

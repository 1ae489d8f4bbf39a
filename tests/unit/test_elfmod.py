"""elfmod: .modinfo, __versions, appended PKCS#7 signatures, Module.symvers and the CRC check.

The modules here are ELF files written by the test (a real ELF layout: header, section headers,
section name table), signed the way the kernel's scripts/sign-file signs (CMS, no attributes, no
certificates, DER) with openssl. Where kmod's ``modinfo`` is installed it reads the same files, and
both readings must agree.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import elfmod
from sim.signing import make_signing_pair

KVER = "6.1.0-50-amd64"
VERMAGIC = KVER + " SMP preempt mod_unload modversions "


def make_elf(sections: dict[str, bytes], elf_class: int = 64, big_endian: bool = False) -> bytes:
    """A relocatable ELF with the given PROGBITS sections (enough for modinfo and elfmod)."""
    e = ">" if big_endian else "<"
    names = [""] + list(sections) + [".shstrtab"]
    shstr = b"\0"
    name_off = {"": 0}
    for n in names[1:]:
        name_off[n] = len(shstr)
        shstr += n.encode() + b"\0"
    blobs = [b""] + list(sections.values()) + [shstr]
    ehsize, shentsize = (64, 64) if elf_class == 64 else (52, 40)
    body = b""
    offsets = []
    pos = ehsize
    for b in blobs:
        pad = (-pos) % 8
        body += b"\0" * pad
        pos += pad
        offsets.append(pos)
        body += b
        pos += len(b)
    pad = (-pos) % 8
    body += b"\0" * pad
    shoff = pos + pad
    ident = b"\x7fELF" + bytes([2 if elf_class == 64 else 1, 2 if big_endian else 1, 1, 0]) + b"\0" * 8
    if elf_class == 64:
        hdr = ident + struct.pack(e + "HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize,
                                  len(blobs), len(blobs) - 1)
    else:
        hdr = ident + struct.pack(e + "HHIIIIIHHHHHH", 1, 3, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize,
                                  len(blobs), len(blobs) - 1)
    shdrs = b""
    for i, n in enumerate(names):
        if i == 0:
            shdrs += b"\0" * shentsize
            continue
        typ = 3 if n == ".shstrtab" else 1
        if elf_class == 64:
            shdrs += struct.pack(e + "IIQQQQIIQQ", name_off[n], typ, 2, 0, offsets[i], len(blobs[i]), 0, 0, 8, 0)
        else:
            shdrs += struct.pack(e + "IIIIIIIIII", name_off[n], typ, 2, 0, offsets[i], len(blobs[i]), 0, 0, 8, 0)
    return hdr + body + shdrs


def modinfo_blob(**kv: str) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in kv.items())


def versions_blob(entries: list[tuple[str, int]], elf_class: int = 64, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    word = 8 if elf_class == 64 else 4
    out = b""
    for name, crc in entries:
        out += struct.pack(e + ("Q" if word == 8 else "I"), crc) + name.encode().ljust(64 - word, b"\0")
    return out


def make_module(name: str = "modulus_test", depends: str = "", vermagic: str = VERMAGIC,
                versions: list[tuple[str, int]] | None = None, elf_class: int = 64, big_endian: bool = False) -> bytes:
    versions = versions if versions is not None else [("module_layout", 0xBCE1A965), ("_printk", 0x92997ED8)]
    return make_elf({
        ".text": b"\xc3" * 16,
        ".modinfo": modinfo_blob(license="GPL", depends=depends, name=name, vermagic=vermagic),
        "__versions": versions_blob(versions, elf_class, big_endian),
    }, elf_class, big_endian)


@pytest.fixture(scope="module")
def signing_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    return make_signing_pair(tmp_path_factory.mktemp("keys"), "modulus unit signer", days=2)


def sign_like_sign_file(data: bytes, key: Path, cert: Path, tmp: Path) -> bytes:
    """What scripts/sign-file does: CMS over the module, no attributes, no certs, DER, then the trailer."""
    src = tmp / "unsigned.ko"
    src.write_bytes(data)
    sig = subprocess.run(["openssl", "cms", "-sign", "-in", str(src), "-signer", str(cert), "-inkey", str(key),
                          "-binary", "-noattr", "-nocerts", "-outform", "DER", "-md", "sha256", "-nosmimecap"],
                         check=True, capture_output=True).stdout
    return data + sig + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(sig)) + elfmod.SIG_MAGIC


def test_modinfo_and_versions_64le() -> None:
    mi = elfmod.read_module_bytes(make_module(depends="i2c_core,drm"), "x.ko")
    assert mi.name == "modulus_test"
    assert mi.vermagic == VERMAGIC
    assert mi.depends == ["i2c_core", "drm"]
    assert mi.versions == [("module_layout", 0xBCE1A965), ("_printk", 0x92997ED8)]
    assert mi.signature is None and mi.signer is None


@pytest.mark.parametrize("elf_class,big", [(32, False), (64, True), (32, True)])
def test_other_elf_layouts(elf_class: int, big: bool) -> None:
    mi = elfmod.read_module_bytes(make_module(elf_class=elf_class, big_endian=big,
                                              versions=[("kfree", 0x37A0CBA)]), "y.ko")
    assert mi.elf_class == elf_class
    assert mi.versions == [("kfree", 0x37A0CBA)]
    assert mi.vermagic == VERMAGIC


def test_not_a_module() -> None:
    with pytest.raises(elfmod.ModuleFormatError, match="not an ELF"):
        elfmod.read_module_bytes(b"#!/bin/sh\necho hi\n" * 4)
    with pytest.raises(elfmod.ModuleFormatError, match="no .modinfo"):
        elfmod.read_module_bytes(make_elf({".text": b"\xc3"}), "plain.o")
    truncated = make_module()[:100]
    with pytest.raises(elfmod.ModuleFormatError):
        elfmod.read_module_bytes(truncated)


def test_bad_versions_size() -> None:
    data = make_elf({".modinfo": modinfo_blob(name="m", vermagic=VERMAGIC), "__versions": b"\0" * 65})
    with pytest.raises(elfmod.ModuleFormatError, match="multiple of 64"):
        elfmod.read_module_bytes(data)


def test_signature_signer_and_key_id(signing_pair: tuple[Path, Path, str], tmp_path: Path) -> None:
    key, cert, want = signing_pair
    signed = sign_like_sign_file(make_module(), key, cert, tmp_path)
    mi = elfmod.read_module_bytes(signed, "s.ko")
    assert mi.signature is not None
    assert mi.signature.signer == "modulus unit signer"
    assert mi.signature.key_id == want.upper()
    assert mi.signature.hash_algo == "sha256"
    # the module part is still read correctly behind the signature
    assert mi.vermagic == VERMAGIC and mi.versions[0][0] == "module_layout"
    path = tmp_path / "s.ko"
    path.write_bytes(signed)
    if shutil.which("modinfo") or Path("/usr/sbin/modinfo").exists():
        tool = shutil.which("modinfo") or "/usr/sbin/modinfo"
        got = subprocess.run([tool, "-F", "signer", str(path)], capture_output=True, text=True,
                             check=True).stdout.strip()
        key_id = subprocess.run([tool, "-F", "sig_key", str(path)], capture_output=True, text=True,
                                check=True).stdout.strip()
        assert got == mi.signature.signer
        assert key_id == mi.signature.key_id


def test_corrupt_signature_trailer() -> None:
    data = make_module() + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 10 ** 6) + elfmod.SIG_MAGIC
    with pytest.raises(elfmod.ModuleFormatError, match="larger than the file"):
        elfmod.read_module_bytes(data)


SYMVERS = (
    "0x92997ed8\t_printk\tvmlinux\tEXPORT_SYMBOL\t\n"
    "0xbce1a965\tmodule_layout\tvmlinux\tEXPORT_SYMBOL\t\n"
    "0x12345678\ti2c_add_adapter\tdrivers/i2c/i2c-core\tEXPORT_SYMBOL\t\n"
    "0xdeadbeef\tdma_buf_get\tvmlinux\tEXPORT_SYMBOL_NS_GPL\tDMA_BUF\n"
    "garbage line\n"
)


def test_parse_symvers() -> None:
    s = elfmod.parse_symvers(SYMVERS)
    assert s["_printk"] == (0x92997ED8, "vmlinux")
    assert s["i2c_add_adapter"] == (0x12345678, "drivers/i2c/i2c-core")
    assert s["dma_buf_get"][0] == 0xDEADBEEF
    assert len(s) == 4


def test_check_ok_and_mismatches() -> None:
    ks = elfmod.parse_symvers(SYMVERS)
    good = elfmod.read_module_bytes(make_module(), "g.ko")
    res = elfmod.check_module(good, KVER, ks)
    assert res.ok and res.checked == 2

    other_kernel = elfmod.check_module(good, "6.1.0-47-amd64", ks)
    assert not other_kernel.ok and not other_kernel.vermagic_ok
    assert "vermagic" in other_kernel.problems()[0]

    bad = elfmod.read_module_bytes(make_module(versions=[("_printk", 0x11111111), ("module_layout", 0xBCE1A965)]))
    res = elfmod.check_module(bad, KVER, ks)
    assert not res.ok
    assert res.bad_crcs == [("_printk", 0x11111111, 0x92997ED8, "vmlinux")]
    assert "_printk" in res.problems()[0]

    unknown = elfmod.read_module_bytes(make_module(versions=[("no_such_symbol", 1)]))
    res = elfmod.check_module(unknown, KVER, ks)
    assert res.unresolved == ["no_such_symbol"] and not res.ok


def test_sibling_symbols_use_the_build_table() -> None:
    ks = elfmod.parse_symvers(SYMVERS)
    own = elfmod.parse_symvers("0x0badf00d\tnvUvmInterfaceRegisterGpu\t/x/nvidia\tEXPORT_SYMBOL\t\n")
    mi = elfmod.read_module_bytes(make_module(versions=[("nvUvmInterfaceRegisterGpu", 0x0BADF00D),
                                                        ("_printk", 0x92997ED8)]))
    assert elfmod.check_module(mi, KVER, ks, own).ok
    assert not elfmod.check_module(mi, KVER, ks).ok  # without the build's table it is unresolved
    wrong = elfmod.parse_symvers("0x00000001\tnvUvmInterfaceRegisterGpu\t/x/nvidia\tEXPORT_SYMBOL\t\n")
    assert elfmod.check_module(mi, KVER, ks, wrong).bad_crcs


def test_no_kernel_table_checks_vermagic_only() -> None:
    mi = elfmod.read_module_bytes(make_module(versions=[("anything", 5)]))
    res = elfmod.check_module(mi, KVER, None)
    assert res.ok and res.checked == 0


def test_check_build_reads_every_module_of_a_tree(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "good.ko").write_bytes(make_module("good"))
    (tmp_path / "sub" / "bad-crc.ko").write_bytes(make_module("bad_crc", versions=[("_printk", 1)]))
    (tmp_path / "junk.ko").write_bytes(b"not elf")
    (tmp_path / "notes.txt").write_text("x")
    mods = elfmod.find_modules(str(tmp_path))
    assert sorted(mods) == ["bad-crc", "good", "junk"] and mods["bad-crc"].endswith("sub/bad-crc.ko")
    symvers = tmp_path / "Module.symvers"
    symvers.write_text(SYMVERS)
    infos, problems, checked = elfmod.check_build(mods, KVER, str(symvers), str(tmp_path / "absent.symvers"))
    assert [mi.name for mi in infos] == ["bad_crc", "good"] and checked == 3
    assert problems[0].startswith("bad-crc.ko: symbol _printk CRC 0x00000001") and problems[1].startswith("junk.ko:")
    infos, problems, checked = elfmod.check_build({"good": mods["good"]}, KVER, None, None)
    assert problems == [] and checked == 0  # no kernel table: vermagic only

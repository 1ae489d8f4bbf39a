# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read Linux kernel modules (``.ko``) in pure Python and check them against a kernel.

What is read, without ``modinfo`` or ``readelf``:

- the ELF section headers (32/64 bit, little/big endian);
- ``.modinfo``: ``key=value`` strings (``vermagic``, ``name``, ``depends``, ``srcversion`` ...);
- ``__versions``: the CRC of every symbol the module imports (``struct modversion_info``);
- the appended signature (``~Module signature appended~``): ``struct module_signature`` gives
  the id type and the length; for PKCS#7 (the kind ``scripts/sign-file`` writes) a short DER walk
  gives the signer (last RDN of the issuer, what ``modinfo`` prints), the key id (the
  certificate serial number) and the digest algorithm.

And ``Module.symvers`` files, so ``check_module`` can compare each imported CRC with the kernel's
export table (and the build's own table for symbols exported by sibling modules); ``check_build``
does that for every module of a build.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

SIG_MAGIC = b"~Module signature appended~\n"
_SIG_STRUCT = struct.Struct(">BBBBB3xI")  # algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len
PKEY_ID_PKCS7 = 2

_OID_NAMES = {
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.8": "sha3-256",
    "2.16.840.1.101.3.4.2.9": "sha3-384",
    "2.16.840.1.101.3.4.2.10": "sha3-512",
}


class ModuleFormatError(ValueError):
    """The file is not a kernel module this code can read."""


@dataclass
class Signature:
    id_type: int
    signer: str | None
    key_id: str | None  # "05:94:87:..." as modinfo prints sig_key
    hash_algo: str | None
    sig_len: int


@dataclass
class ModuleInfo:
    path: str
    size: int
    modinfo: dict[str, list[str]]
    versions: list[tuple[str, int]]  # (symbol, crc)
    signature: Signature | None = None
    elf_class: int = 64

    def first(self, key: str) -> str | None:
        vals = self.modinfo.get(key)
        return vals[0] if vals else None

    @property
    def name(self) -> str:
        n = self.first("name")
        if n:
            return n
        return os.path.basename(self.path)[:-3].replace("-", "_") if self.path.endswith(".ko") else os.path.basename(self.path)

    @property
    def vermagic(self) -> str | None:
        return self.first("vermagic")

    @property
    def depends(self) -> list[str]:
        d = self.first("depends") or ""
        return [x for x in d.split(",") if x]

    @property
    def signer(self) -> str | None:
        return self.signature.signer if self.signature else None


@dataclass
class CheckResult:
    module: str
    vermagic_ok: bool
    vermagic: str | None
    bad_crcs: list[tuple[str, int, int, str]] = field(default_factory=list)  # sym, module crc, expected crc, exporter
    unresolved: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return self.vermagic_ok and not self.bad_crcs and not self.unresolved

    def problems(self) -> list[str]:
        out = []
        if not self.vermagic_ok:
            out.append(f"vermagic {self.vermagic!r}")
        for sym, have, want, exporter in self.bad_crcs:
            out.append(f"symbol {sym} CRC 0x{have:08x} != 0x{want:08x} ({exporter})")
        if self.unresolved:
            out.append("symbols exported by neither the kernel nor this build: {}".format(", ".join(self.unresolved)))
        return out


# --------------------------------------------------------------------------- ELF


def split_signature(data: bytes) -> tuple[bytes, Signature | None]:
    """Return (module bytes without signature, parsed signature or None)."""
    if not data.endswith(SIG_MAGIC):
        return data, None
    end = len(data) - len(SIG_MAGIC)
    if end < _SIG_STRUCT.size:
        raise ModuleFormatError("signature trailer too short")
    algo, hash_, id_type, signer_len, key_id_len, sig_len = _SIG_STRUCT.unpack_from(data, end - _SIG_STRUCT.size)
    del algo, hash_
    start = end - _SIG_STRUCT.size - sig_len - signer_len - key_id_len
    if start < 0:
        raise ModuleFormatError(f"signature length {sig_len} larger than the file")
    sig_bytes = data[end - _SIG_STRUCT.size - sig_len:end - _SIG_STRUCT.size]
    signer = key_id = algo_name = None
    if id_type == PKEY_ID_PKCS7:
        signer, key_id, algo_name = parse_pkcs7_signer(sig_bytes)
    return data[:start], Signature(id_type=id_type, signer=signer, key_id=key_id, hash_algo=algo_name, sig_len=sig_len)


def _sections(data: bytes) -> tuple[dict[str, tuple[int, int]], int, str]:
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise ModuleFormatError("not an ELF file")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ModuleFormatError(f"unknown ELF class/data {ei_class}/{ei_data}")
    end = "<" if ei_data == 1 else ">"
    if ei_class == 2:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
        sh = struct.Struct(end + "IIQQQQIIQQ")
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
        sh = struct.Struct(end + "IIIIIIIIII")
    if shoff == 0 or shentsize < sh.size:
        raise ModuleFormatError("no section header table")
    if shnum == 0 and shoff + sh.size <= len(data):  # extended numbering: count in section 0's sh_size
        shnum = sh.unpack_from(data, shoff)[5]
    if shoff + shnum * shentsize > len(data):
        raise ModuleFormatError("section header table beyond end of file")
    headers = [sh.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    if shstrndx == 0xFFFF:
        shstrndx = headers[0][7]
    if shstrndx >= shnum:
        raise ModuleFormatError("bad section name table index")
    str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
    names = data[str_off:str_off + str_size]
    out = {}
    for h in headers:
        name_off, sh_type, offset, size = h[0], h[1], h[4], h[5]
        nul = names.find(b"\0", name_off)
        name = names[name_off:nul if nul >= 0 else None].decode("ascii", "replace")
        if sh_type == 8:  # SHT_NOBITS
            continue
        if offset + size > len(data):
            raise ModuleFormatError(f"section {name} beyond end of file")
        out[name] = (offset, size)
    return out, (64 if ei_class == 2 else 32), end


def parse_modinfo(blob: bytes) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for raw in blob.split(b"\0"):
        if not raw or b"=" not in raw:
            continue
        k, _sep, v = raw.partition(b"=")
        info.setdefault(k.decode("utf-8", "replace"), []).append(v.decode("utf-8", "replace"))
    return info


def parse_versions(blob: bytes, elf_class: int, endian: str) -> list[tuple[str, int]]:
    word = 8 if elf_class == 64 else 4
    entry = 64  # MODULE_NAME_LEN + sizeof(unsigned long)
    if len(blob) % entry:
        raise ModuleFormatError(f"__versions size {len(blob)} is not a multiple of {entry}")
    out = []
    fmt = endian + ("Q" if word == 8 else "I")
    for off in range(0, len(blob), entry):
        crc, = struct.unpack_from(fmt, blob, off)
        name = blob[off + word:off + entry].split(b"\0", 1)[0].decode("ascii", "replace")
        out.append((name, crc & 0xFFFFFFFF))
    return out


def read_module_bytes(data: bytes, path: str = "<bytes>") -> ModuleInfo:
    body, sig = split_signature(data)
    secs, elf_class, endian = _sections(body)
    if ".modinfo" not in secs:
        raise ModuleFormatError(f"{path} has no .modinfo section: not a kernel module")
    off, size = secs[".modinfo"]
    modinfo = parse_modinfo(body[off:off + size])
    versions: list[tuple[str, int]] = []
    if "__versions" in secs:
        off, size = secs["__versions"]
        versions = parse_versions(body[off:off + size], elf_class, endian)
    return ModuleInfo(path=path, size=len(data), modinfo=modinfo, versions=versions, signature=sig, elf_class=elf_class)


def read_module(path: str) -> ModuleInfo:
    with open(path, "rb") as f:
        data = f.read()
    return read_module_bytes(data, path)


# --------------------------------------------------------------------------- DER (PKCS#7)


def _der(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """Return (tag, content start, content end, next position) of the DER element at pos."""
    if pos + 2 > len(data):
        raise ModuleFormatError("truncated DER")
    tag = data[pos]
    ln = data[pos + 1]
    pos += 2
    if ln & 0x80:
        n = ln & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ModuleFormatError("unsupported DER length")
        ln = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + ln > len(data):
        raise ModuleFormatError("DER element beyond end")
    return tag, pos, pos + ln, pos + ln


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e, pos = _der(data, pos)
        out.append((tag, s, e))
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        return ""
    parts = [raw[0] // 40, raw[0] % 40]
    val = 0
    for b in raw[1:]:
        val = (val << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(val)
            val = 0
    return ".".join(str(p) for p in parts)


def _name_last_value(data: bytes, s: int, e: int) -> str | None:
    """Value of the last attribute of an X.501 Name (what kmod's modinfo prints as signer)."""
    last = None
    for tag, rs, re_ in _children(data, s, e):  # SET OF RDN
        if tag != 0x31:
            continue
        for tag2, as_, ae in _children(data, rs, re_):  # AttributeTypeAndValue
            if tag2 != 0x30:
                continue
            kids = _children(data, as_, ae)
            if len(kids) == 2:
                _t, vs, ve = kids[1]
                last = data[vs:ve].decode("utf-8", "replace")
    return last


def parse_pkcs7_signer(sig: bytes) -> tuple[str | None, str | None, str | None]:
    """(signer, key id, digest algorithm) of the first SignerInfo of a PKCS#7 SignedData."""
    tag, s, e, _next = _der(sig, 0)
    if tag != 0x30:
        raise ModuleFormatError("PKCS#7: not a SEQUENCE")
    kids = _children(sig, s, e)
    if len(kids) < 2 or kids[1][0] != 0xA0:
        raise ModuleFormatError("PKCS#7: no content")
    tag, s2, e2, _next = _der(sig, kids[1][1])
    signed = _children(sig, s2, e2)  # version, digestAlgorithms, contentInfo, [0] certs?, [1] crls?, signerInfos
    signer_infos = [k for k in signed if k[0] == 0x31]
    if len(signer_infos) < 2:
        raise ModuleFormatError("PKCS#7: no signerInfos")
    si_set = signer_infos[-1]
    infos = _children(sig, si_set[1], si_set[2])
    if not infos:
        raise ModuleFormatError("PKCS#7: empty signerInfos")
    si = _children(sig, infos[0][1], infos[0][2])
    if len(si) < 3:
        raise ModuleFormatError("PKCS#7: short SignerInfo")
    signer = key_id = None
    sid_tag, ss, se = si[1]
    if sid_tag == 0x30:  # issuerAndSerialNumber
        parts = _children(sig, ss, se)
        if len(parts) == 2:
            signer = _name_last_value(sig, parts[0][1], parts[0][2])
            serial = sig[parts[1][1]:parts[1][2]].lstrip(b"\0") or b"\0"
            key_id = ":".join(f"{b:02X}" for b in serial)
    elif sid_tag == 0x80:  # [0] subjectKeyIdentifier
        key_id = ":".join(f"{b:02X}" for b in sig[ss:se])
    algo = None
    alg_tag, als, ale = si[2]
    if alg_tag == 0x30:
        ak = _children(sig, als, ale)
        if ak and ak[0][0] == 0x06:
            oid = _oid(sig[ak[0][1]:ak[0][2]])
            algo = _OID_NAMES.get(oid, oid)
    return signer, key_id, algo


# --------------------------------------------------------------------------- Module.symvers and checks


def parse_symvers(text: str) -> dict[str, tuple[int, str]]:
    """symbol -> (crc, exporting module) from a Module.symvers file's text."""
    out: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[0].startswith("0x"):
            continue
        try:
            crc = int(parts[0], 16)
        except ValueError:
            continue
        out[parts[1]] = (crc, parts[2])
    return out


def read_symvers(path: str) -> dict[str, tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_symvers(f.read())


def vermagic_release(vermagic: str | None) -> str | None:
    return vermagic.split()[0] if vermagic else None


def check_module(
    mod: ModuleInfo,
    kernel_release: str,
    kernel_symvers: dict[str, tuple[int, str]] | None,
    build_symvers: dict[str, tuple[int, str]] | None = None,
) -> CheckResult:
    """Check a module's vermagic against ``kernel_release`` and each imported CRC.

    Symbols exported by the build itself (``build_symvers``, the sibling modules) are checked
    against that table, every other one against the kernel's. With no kernel table only the
    vermagic is checked (``checked`` stays 0).
    """
    vm = mod.vermagic
    res = CheckResult(module=mod.name, vermagic=vm, vermagic_ok=vermagic_release(vm) == kernel_release)
    if kernel_symvers is None:
        return res
    own = build_symvers or {}
    for sym, crc in mod.versions:
        if sym in own:
            want, exporter = own[sym]
        elif sym in kernel_symvers:
            want, exporter = kernel_symvers[sym]
        else:
            res.unresolved.append(sym)
            continue
        res.checked += 1
        if want != crc:
            res.bad_crcs.append((sym, crc, want, exporter))
    return res


# --------------------------------------------------------------------------- a build's modules


def find_modules(moddir: str) -> dict[str, str]:
    """module file name (without .ko) -> path, for every .ko under moddir."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(moddir):
        for fn in files:
            if fn.endswith(".ko"):
                out.setdefault(fn[:-3], os.path.join(dirpath, fn))
    return out


def check_build(mod_paths: dict[str, str], kernel_release: str, kernel_symvers_path: str | None,
                build_symvers_path: str | None) -> tuple[list[ModuleInfo], list[str], int]:
    """Read and check every module of a build (name -> path) against ``kernel_release`` and the
    kernel's and the build's Module.symvers (either may be absent); returns (infos, problems,
    number of CRCs checked)."""
    ksyms = read_symvers(kernel_symvers_path) if kernel_symvers_path and os.path.isfile(kernel_symvers_path) else None
    bsyms = read_symvers(build_symvers_path) if build_symvers_path and os.path.isfile(build_symvers_path) else {}
    infos: list[ModuleInfo] = []
    problems: list[str] = []
    checked = 0
    for name in sorted(mod_paths):
        try:
            mi = read_module(mod_paths[name])
        except (ModuleFormatError, OSError) as exc:
            problems.append(f"{name}.ko: {exc}")
            continue
        res = check_module(mi, kernel_release, ksyms, bsyms)
        checked += res.checked
        for p in res.problems():
            problems.append(f"{name}.ko: {p}")
        infos.append(mi)
    return infos, problems, checked

"""The build identity: one vocabulary, one module_type rule, whole-string validation."""

from __future__ import annotations

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils import identity as idm


@pytest.mark.parametrize(("driver", "version", "requested", "expected"), [
    ("nvidia", "535.104.05", "auto", "proprietary"),
    ("nvidia", "535.104.05", None, "proprietary"),
    ("nvidia", "555.58", "auto", "proprietary"),
    ("nvidia", "560.35.03", "auto", "open"),
    ("nvidia", "570.86.15", None, "open"),
    ("nvidia", "570.86.15", "proprietary", "proprietary"),
    ("nvidia", "535.104.05", "open", "open"),
    ("NVIDIA", "560.35.03", "auto", "open"),
    ("modulus-hello", "1.0.0", None, "default"),
    ("modulus-hello", "1.0.0", "auto", "default"),
    ("v4l2loopback", "0.13.2", "default", "default"),
])
def test_one_rule_for_module_type(driver: str, version: str, requested, expected: str) -> None:
    assert idm.resolve_module_type(driver, version, requested) == expected


def test_open_modules_do_not_exist_before_515() -> None:
    with pytest.raises(idm.IdentityError, match="module_type=open: driver 470.256.02 has no open kernel modules"):
        idm.resolve_module_type("nvidia", "470.256.02", "open")
    with pytest.raises(idm.IdentityError, match="module_type='closed' is not one of"):
        idm.resolve_module_type("nvidia", "535.104.05", "closed")


@pytest.mark.parametrize(("check", "value"), [
    (idm.check_name, "modulus-hello\n"),
    (idm.check_name, "a/b"),
    (idm.check_name, ".."),
    (idm.check_os_version, "4459.2.1\n"),
    (idm.check_os_version, "4459"),
    (idm.check_kernel_release, "6.1.0-50-amd64\n"),
    (idm.check_kernel_release, "6.1/../x"),
    (idm.check_board, "amd64-usr\n"),
    (idm.check_board, "AMD64"),
    (idm.check_os, "flatcar\n"),
])
def test_whole_strings_are_checked(check, value: str) -> None:
    with pytest.raises(idm.IdentityError, match=r"^opt="):
        check("opt", value)


def test_nvidia_versions_are_stricter_than_others() -> None:
    assert idm.check_driver_version("v", "535.104.05", "nvidia") == "535.104.05"
    assert idm.check_driver_version("v", "1.0.0-rc1", "hello") == "1.0.0-rc1"
    for bad in ("535.104.05\n", "535", "latest"):
        with pytest.raises(idm.IdentityError, match="NVIDIA driver version"):
            idm.check_driver_version("driver_version", bad, "nvidia")


def test_make_identity_resolves_and_checks() -> None:
    ident = idm.make_identity(os_version="4459.2.1", kernel_release="6.6.95-flatcar", driver="nvidia",
                              driver_version="570.86.15", signer="AB:CD:EF:01:23:45:67:89")
    assert ident == {"os": "flatcar", "board": "amd64-usr", "os_version": "4459.2.1",
                     "kernel_release": "6.6.95-flatcar", "driver": "nvidia", "driver_version": "570.86.15",
                     "module_type": "open", "signer": "abcdef0123456789"}
    with pytest.raises(idm.IdentityError, match="kernel_release is required"):
        idm.make_identity(os_version="4459.2.1", driver="nvidia", driver_version="535.104.05")
    with pytest.raises(idm.IdentityError, match="os_version='4459.2.1\\\\n'"):
        idm.make_identity(os_version="4459.2.1\n", kernel_release="6.6.95-flatcar", driver="nvidia",
                          driver_version="535.104.05")


def test_identity_from_manifest_maps_the_signer_and_the_default_variant() -> None:
    manifest = {"os": "flatcar", "board": "amd64-usr", "os_version": "9001.2.0", "kernel_release": "6.1.0-50-amd64",
                "driver": "modulus-hello", "driver_version": "1.0.0", "module_type": None,
                "signing_key_fingerprint": "ABCDEF0123456789", "files": {}}
    ident = idm.identity_from_manifest(manifest)
    assert ident["module_type"] == "default" and ident["signer"] == "abcdef0123456789"
    assert set(ident) == set(idm.IDENTITY_FIELDS)
    assert idm.identity_mismatches(ident, {"driver": "modulus-hello", "signer": "AB:CD:EF:01:23:45:67:89"}) == []
    assert idm.identity_mismatches(ident, {"kernel_release": "6.1.0-47-amd64"}) == [
        "kernel_release: '6.1.0-50-amd64' != '6.1.0-47-amd64'"]


def test_one_layout_for_builds_on_a_host() -> None:
    ident = {"driver": "nvidia", "driver_version": "535.104.05", "kernel_release": "6.6.95-flatcar"}
    assert idm.build_dir("/opt/modulus/archive", ident) == "/opt/modulus/archive/nvidia/535.104.05/6.6.95-flatcar"
    with pytest.raises(idm.IdentityError, match="kernel_release="):
        idm.build_dir("/opt/modulus/archive", ident | {"kernel_release": "../../etc"})

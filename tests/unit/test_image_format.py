"""Which format a sysext image gets (_install/image_format.py)."""

from __future__ import annotations

import pytest

from ansible_collections.modulus.kmods.plugins.module_utils._install import image_format as imf


def finder(*present: str):
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize("tools,fmt", [((), "directory"), (("mksquashfs",), "squashfs"),
                                       (("mkfs.erofs",), "erofs"), (("mkfs.erofs", "mksquashfs"), "erofs")])
def test_auto_picks_what_the_host_can_make(tools, fmt) -> None:
    got = imf.choose("auto", finder=finder(*tools))
    assert got.fmt == fmt and got.reason.startswith("auto: ")


def test_auto_keeps_the_format_in_place() -> None:
    got = imf.choose("auto", existing="squashfs", finder=finder("mkfs.erofs"))
    assert got.fmt == "squashfs" and "in place" in got.reason
    assert imf.choose("auto", existing="directory", finder=finder("mkfs.erofs", "mksquashfs")).fmt == "directory"


@pytest.mark.parametrize("fmt,tool", [("squashfs", "mksquashfs"), ("erofs", "mkfs.erofs")])
def test_explicit_format_fails_clearly_without_its_tool(fmt, tool) -> None:
    with pytest.raises(imf.FormatError, match=f"sysext_format={fmt} needs {tool}"):
        imf.choose(fmt, finder=finder())
    assert imf.choose(fmt, finder=finder(tool)).fmt == fmt
    assert imf.choose("directory", finder=finder()).fmt == "directory"


def test_unknown_format() -> None:
    with pytest.raises(imf.FormatError, match="sysext_format='zip' is not one of auto, erofs, squashfs, directory"):
        imf.choose("zip")

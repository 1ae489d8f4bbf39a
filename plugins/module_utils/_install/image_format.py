# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which format a sysext image gets on this host (``sysext_format``).

``auto`` (the default) picks what the host can make with nothing added: ``erofs`` when
``mkfs.erofs`` is on PATH (Flatcar ``main`` since April 2026), else ``squashfs`` when ``mksquashfs``
is (not in any stock Flatcar host image), else a ``directory`` extension (every stable and LTS
host: systemd-sysext merges a plain directory like an image). An image that is already in place
and up to date keeps its format, so a host never flips formats from one run to the next.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Callable, Optional

FORMATS = ("auto", "erofs", "squashfs", "directory")
TOOLS = {"erofs": ("mkfs.erofs", "erofs-utils"), "squashfs": ("mksquashfs", "squashfs-tools")}

Finder = Callable[[str], Optional[str]]


def find_tool(name: str) -> Optional[str]:
    """An image tool on PATH only: a strict PATH (what a stock host has) must hide what it hides."""
    return shutil.which(name)


@dataclass
class Choice:
    fmt: str
    reason: str


class FormatError(ValueError):
    """An explicit format whose tool is missing, or an unknown format."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FormatError("sysext_format={!r} is not one of {}".format(fmt, ", ".join(FORMATS)))
    return fmt


def choose(requested: str, existing: Optional[str] = None, finder: Finder = find_tool) -> Choice:
    """The format for a new or rebuilt image. ``existing``: the format of the image in place whose
    content is still right (then it is kept and nothing is made)."""
    check_format(requested)
    if requested != "auto":
        if requested in TOOLS and not finder(TOOLS[requested][0]):
            tool, package = TOOLS[requested]
            raise FormatError(f"sysext_format={requested} needs {tool} ({package}) on the managed host and it is "
                              f"not on PATH; stock Flatcar hosts lack it: use sysext_format=auto or directory")
        return Choice(requested, f"sysext_format={requested}")
    if existing:
        return Choice(existing, f"auto: the image in place is {existing} and up to date")
    for fmt in ("erofs", "squashfs"):
        tool = TOOLS[fmt][0]
        if finder(tool):
            return Choice(fmt, f"auto: {tool} is on the host")
    return Choice("directory", "auto: neither mkfs.erofs nor mksquashfs is on the host (stock Flatcar): a directory "
                               "extension")

# Copyright: contributors to modulus.kmods
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Putting builds in service on a host: sysext and tree methods, module loading, the boot path,
retiring old versions."""

# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Host facts: release files, update_engine, USR partitions, the machine's identity, what Flatcar itself runs on the host."""

"""Kernel ABI definitions (constants and binary layouts), no behaviour."""

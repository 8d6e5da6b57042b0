"""Provenance records the machine a number was computed on."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.provenance import _ISA_FLAGS, cpu_info, environment


def test_cpu_info_names_the_cpu_and_its_float_kernels():
    info = cpu_info()
    assert info["model"]
    assert set(info["isa"]) <= set(_ISA_FLAGS)
    assert info["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the flags are the kernel's, in our fixed order
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features")))
        present = set(flags.partition(":")[2].split())
        assert info["isa"] == [flag for flag in _ISA_FLAGS if flag in present]


def test_environment_carries_the_cpu():
    env = environment("cpu")
    assert env["cpu"] == cpu_info()
    assert env["torch_threads"] == torch.get_num_threads()

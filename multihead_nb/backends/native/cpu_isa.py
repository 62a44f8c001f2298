"""Which instruction sets this CPU runs, and the compiler flags of each: the CPU's features (/proc/cpuinfo, or
sysctl on macOS), two features /proc/cpuinfo does not name (AVX-512 on 256-bit units; `prefetcht1` stopping at the
L2), less those $MULTIHEAD_CPU_FLAGS_OFF hides, and per instruction set (AVX-512 with BF16 and VNNI where present,
AVX2 + FMA with AVX-VNNI where present, ARM NEON with dotprod where present, scalar C) the flags its build gets.
Knows nothing of compiling, caching or loading the kernel (`cpu_kernel.py`), nor of models.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

ISAS = ("avx512", "avx2", "neon", "scalar")  # best first
FLAGS_OFF_ENV = "MULTIHEAD_CPU_FLAGS_OFF"
DOUBLE_PUMPED = "avx512_double_pumped"  # not a /proc/cpuinfo flag: AVX-512 on 256-bit units (cpu_features)
PREFETCH_T1_L2 = "prefetch_t1_l2"  # not a /proc/cpuinfo flag: prefetcht1 stops at the L2 (prefetch_t1_stops_at_l2)


def prefetch_t1_stops_at_l2(vendor: str, family: int, feats: set[str] | frozenset[str]) -> bool:
    """Whether this x86 CPU's `prefetcht1` fills the L2 and not the L1: Intel's do (its manuals: "into level 2 cache
    and higher"), AMD's from Zen 4 (family 25 with AVX-512, or later families); before Zen 4 AMD's fill the L1 too
    (public measurements), where the attention's far fetches (mh_attention_allkv.h) would crowd the L1."""
    if vendor == "GenuineIntel":
        return True
    return vendor == "AuthenticAMD" and (family > 25 or (family == 25 and "avx512f" in feats))


def cpu_features() -> tuple[str, frozenset[str]]:
    """(machine, feature flags): x86 `flags` or ARM `Features` of /proc/cpuinfo (macOS: sysctl), plus
    `avx512_double_pumped` where AVX-512 runs on 256-bit units (AMD family 25, Zen 4: the kernel's Q8_0 decode then
    goes 256 bits wide) and `prefetch_t1_l2` where prefetcht1 stops at the L2 (prefetch_t1_stops_at_l2), less those
    named in $MULTIHEAD_CPU_FLAGS_OFF (e.g. "avx_vnni avx512_vnni": the builds a CPU without VNNI gets, to measure
    them on this one)."""
    machine = platform.machine().lower()
    feats: set[str] = set()
    vendor = family = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    feats.update(line.split(":", 1)[1].split())
                elif line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("cpu family"):
                    family = line.split(":", 1)[1].strip()
    except OSError:
        pass
    if vendor == "AuthenticAMD" and family == "25" and "avx512f" in feats:
        feats.add(DOUBLE_PUMPED)
    if family.isdigit() and prefetch_t1_stops_at_l2(vendor, int(family), feats):
        feats.add(PREFETCH_T1_L2)
    if sys.platform == "darwin" and machine == "arm64":
        feats.add("asimd")
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            if out == "1":
                feats.add("asimddp")
        except (OSError, subprocess.SubprocessError):
            pass
    return machine, frozenset(feats - set(os.environ.get(FLAGS_OFF_ENV, "").replace(",", " ").split()))


def isa_flags(isa: str, machine: str, feats: frozenset[str]) -> tuple[str, ...] | None:
    """The compiler flags of `isa` on this CPU, or None where the CPU cannot run it."""
    x86 = machine in ("x86_64", "amd64")
    arm = machine in ("aarch64", "arm64")
    avx2 = ("-mavx2", "-mfma", "-mf16c")
    if isa == "avx512" and x86 and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"} <= feats:
        return (*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mtune=native",
                *(("-mavx512bf16",) if "avx512_bf16" in feats else ()),
                *(("-mavx512vnni",) if "avx512_vnni" in feats else ()),
                *(("-DMH_X8_Q8_YMM",) if DOUBLE_PUMPED in feats else ()))  # Q8_0's decode 256 bits wide
    if isa == "avx2" and x86 and {"avx2", "fma", "f16c"} <= feats:
        return (*avx2, "-mtune=native", *(("-mavxvnni",) if "avx_vnni" in feats else ()),
                *(("-DMH_PREFETCH_L2=1",) if PREFETCH_T1_L2 in feats else ()))  # the attention's far fetches
    if isa == "neon" and arm:
        return ("-march=armv8.2-a+dotprod",) if "asimddp" in feats else ("-march=armv8-a",)
    if isa == "scalar":
        return ("-DMH_SCALAR",)
    return None


def cpu_isas() -> list[str]:
    """The instruction sets this CPU runs, best first (scalar always last)."""
    machine, feats = cpu_features()
    return [isa for isa in ISAS if isa_flags(isa, machine, feats) is not None]

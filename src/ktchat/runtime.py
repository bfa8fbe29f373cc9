"""Process settings the CPU experts want that only take effect from the start of a process.

- OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads would otherwise spin on the cores the CPU experts need.
- glibc.malloc.hugetlb=1 (GLIBC_TUNABLES), where the kernel grants transparent huge pages only on request (THP
  "madvise", the usual default): kt_kernel's packed experts then sit on 2 MB pages instead of 4 KB ones. Packing
  stops waiting on page faults, and decode streams them with fewer TLB misses. On the GPU machine (H100, 16-core
  AMX Xeon), a DeepSeek-V2-Lite-sized load went from 10.2 to 6.0 s and decode was 6% faster. glibc reads it only
  when a process starts, so the `ktchat` command starts itself again with it (KTCHAT_HUGE_PAGES=0: never).
"""

from __future__ import annotations

import os

THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# What turns a KTCHAT_* switch off. This module imports nothing but os: the LLaMA-Factory startup hook reads it.
OFF_VALUES = ("0", "false", "off", "no")


def switched_off(variable: str, env=None) -> bool:
    """Whether the KTCHAT_* switch `variable` is off in `env` (default os.environ); unset means on."""
    env = os.environ if env is None else env
    return env.get(variable, "1").strip().lower() in OFF_VALUES


def huge_pages_on_request(thp_enabled=THP_ENABLED) -> bool:
    """True where the kernel gives transparent huge pages only to memory that asks (and glibc can ask)."""
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"; absent on musl and others
        if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):  # the tunable came in 2.35
            return False
        with open(thp_enabled) as f:
            return "[madvise]" in f.read()
    except (OSError, ValueError, AttributeError):
        return False


def wanted_environment(env=None, thp_enabled=THP_ENABLED) -> dict[str, str]:
    """The variables to add to `env` (default os.environ) for a process that runs CPU experts."""
    env = os.environ if env is None else env
    wanted = {}
    if "OMP_WAIT_POLICY" not in env:
        wanted["OMP_WAIT_POLICY"] = "PASSIVE"
    tunables = env.get("GLIBC_TUNABLES", "")
    if (not switched_off("KTCHAT_HUGE_PAGES", env) and "glibc.malloc.hugetlb" not in tunables
            and huge_pages_on_request(thp_enabled)):
        wanted["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    return wanted


def huge_pages_hint() -> str | None:
    """A line for the log where this process could have had huge pages but did not ask at start."""
    if "GLIBC_TUNABLES" not in wanted_environment():
        return None
    return (f"start Python with GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} to put the CPU experts on huge pages "
            "(faster loading and decode; the ktchat command does this itself)")


# The libraries ktchat imports but does not require by distribution name (pyproject.toml, "hf" extra): KT users
# have them from transformers-kt, peft-kt and accelerate-kt, other names for the same modules.
LIBRARY_EXTRA = "hf"


def _library_requirements() -> list:
    """ktchat's own `hf` extra, as installed metadata holds it (none when ktchat runs from a source tree)."""
    import importlib.metadata

    try:
        from packaging.requirements import Requirement

        lines = importlib.metadata.requires("ktchat") or []
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return []
    wanted = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and requirement.marker.evaluate({"extra": LIBRARY_EXTRA}) \
                and not requirement.marker.evaluate({"extra": ""}):
            wanted.append(requirement)
    return wanted


def library_problems() -> list[str]:
    """One line per module of the `hf` extra that is missing or outside its versions, whichever distribution
    provides it (upstream or a KT fork)."""
    import importlib
    import importlib.util

    problems = []
    for requirement in _library_requirements():
        name = requirement.name
        if importlib.util.find_spec(name) is None:
            problems.append(f"the {name} module is missing")
            continue
        version = getattr(importlib.import_module(name), "__version__", None)
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{name} {version} is installed, ktchat needs {name}{requirement.specifier}")
    return problems


def check_libraries() -> None:
    """Raises one line naming what is missing, before any model code imports it."""
    problems = library_problems()
    if problems:
        from .errors import KTChatError

        raise KTChatError(
            f"{'; '.join(problems)}: install ktchat with `pip install 'ktchat[{LIBRARY_EXTRA}]'` (upstream transformers, "
            "peft, accelerate), or into an environment with the KT forks transformers-kt, peft-kt, accelerate-kt")

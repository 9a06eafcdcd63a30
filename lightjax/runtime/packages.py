"""Which install command brings a missing package: read from lightjax's own declared requirements, so
that a missing dependency is named with `pip install -e .` (or the extra that declares it), not a
traceback. `deptry` (CI) keeps those declarations complete."""

from __future__ import annotations

import re
from importlib import metadata

# Import names whose distribution is named otherwise; the rest match after normalising (PEP 503).
_DISTRIBUTIONS = {"absl": "absl-py", "orbax": "orbax-checkpoint", "IPython": "ipython"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str | None]:
    """{normalised distribution: the extra that declares it, None for a core dependency}."""
    try:
        requirements = metadata.requires("lightjax") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    declared: dict[str, str | None] = {}
    for requirement in requirements:
        name = _normal(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if extra is None or name not in declared:
            declared[name] = None if extra is None else extra.group(1)
    return declared


def install_command(module: str) -> str:
    """The command that installs the package providing top-level module `module`: lightjax's install
    (`pip install -e .`, or with the extra that declares the package), else the package by its name."""
    top = module.split(".")[0]
    distribution = _normal(_DISTRIBUTIONS.get(top, top))
    declared = _declared()
    if distribution == "lightjax" or not declared:  # lightjax itself is not installed
        return "pip install -e ."
    if distribution not in declared:
        return f"pip install {_DISTRIBUTIONS.get(top, top)}"
    extra = declared[distribution]
    return "pip install -e ." if extra is None else f'pip install -e ".[{extra}]"'


def missing_module(error: BaseException | None) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError of a package that is not installed which caused `error` (itself, its cause
    or its context), if any. A missing lightjax submodule is a bug, not a package to install."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ModuleNotFoundError) and error.name and not error.name.startswith("lightjax."):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def missing_package_message(error: ModuleNotFoundError) -> str:
    """'the package jinja2 is not installed (No module named 'jinja2'); install it with: pip install -e .'"""
    module = error.name or "?"
    top = module.split(".")[0]
    return f"the package {_DISTRIBUTIONS.get(top, top)} is not installed ({error}); install it with: " \
           f"{install_command(module)}"

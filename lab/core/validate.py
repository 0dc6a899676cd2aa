"""Check every `_target_` in a composed config against the signature it names, before anything is built.

The check reads the target's source with `ast` instead of importing it, because importing lightning,
peft and torch takes several seconds and a misspelled argument should fail in about one. A target whose
source cannot be followed statically (a C extension, a dynamically built class) is imported instead.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lab.core.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that hydra.utils.instantiate consumes itself; they are never passed to the target.
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass(frozen=True)
class Signature:
    """Parameter names of a callable; `var_keyword` when it takes **kwargs."""

    names: tuple[str, ...]
    required: tuple[str, ...]
    var_keyword: bool


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first `_target_` node whose keys do not bind to its signature."""
    for key_path, node in _target_nodes(cfg, ""):
        target = node["_target_"]
        signature = resolve_signature(target)
        if signature is None:
            log.debug("could not read the signature of %s; skipped", target)
            continue
        arguments = [k for k in node.keys() if k not in _HYDRA_KEYS]
        if not signature.var_keyword:
            for key in arguments:
                if key not in signature.names:
                    hint = _closest(key, signature.names)
                    raise ConfigError(
                        f"config key '{_join(key_path, key)}' is not an argument of {target}"
                        + (f"; did you mean '{_join(key_path, hint)}'?" if hint else "")
                        + f" Its arguments are: {', '.join(signature.names)}."
                    )
        if not node.get("_partial_", False):
            missing = [name for name in signature.required if name not in arguments]
            if missing:
                raise ConfigError(
                    f"config node '{key_path or '<root>'}' ({target}) lacks required argument(s) "
                    f"{', '.join(missing)}; set them in the config or on the command line."
                )


def _target_nodes(node: Any, path: str):
    """Yield (key path, node) for every `_target_` node, without resolving interpolations."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, _join(path, str(key)))
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _target_nodes(child, f"{path}[{i}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(key: str, names: tuple[str, ...]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return matches[0] if matches else None


@lru_cache(maxsize=None)
def resolve_signature(target: str) -> Signature | None:
    """Read the signature of a dotted `module.Name` target, statically when possible."""
    module_name, _, name = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"_target_ '{target}' is not a dotted path like 'package.module.Name'.")
    try:
        found = _static_signature(module_name, name, depth=0)
    except (OSError, SyntaxError, ValueError):
        found = None
    if found is not None:
        return found
    return _imported_signature(target)


def _imported_signature(target: str) -> Signature | None:
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"_target_ '{target}' cannot be imported ({err}); check the spelling.") from err
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    return _from_parameters(
        [(p.name, p.default is inspect.Parameter.empty, p.kind) for p in params]
    )


def _from_parameters(params: list[tuple[str, bool, Any]]) -> Signature:
    names, required, var_keyword = [], [], False
    for name, no_default, kind in params:
        if kind == inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            continue
        else:
            names.append(name)
            if no_default:
                required.append(name)
    return Signature(tuple(names), tuple(required), var_keyword)


def _module_file(module_name: str) -> Path | None:
    """Find a module's source file without executing any package __init__."""
    parts = module_name.split(".")
    spec = importlib.util.find_spec(parts[0]) if parts[0] not in sys.modules else sys.modules[parts[0]].__spec__
    if spec is None:
        return None
    if len(parts) == 1:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    locations = list(spec.submodule_search_locations or [])
    for i, part in enumerate(parts[1:], start=1):
        last = i == len(parts) - 1
        found = None
        for location in locations:
            package = Path(location) / part
            if (package / "__init__.py").is_file():
                found = package / "__init__.py"
                locations = [str(package)]
                break
            if last and (Path(location) / f"{part}.py").is_file():
                found = Path(location) / f"{part}.py"
                break
        if found is None:
            return None
        if last:
            return found
    return None


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _static_signature(module_name: str, name: str, depth: int) -> Signature | None:
    if depth > 8:
        return None
    path = _module_file(module_name)
    if path is None:
        return None
    tree = _parse(path)
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return _function_signature(node, skip_self=False)
        if isinstance(node, ast.ClassDef) and node.name == name:
            return _class_signature(node, module_name, package, tree, depth)
    # Not defined here: follow a re-export such as `from .trainer import Trainer`.
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(node, package)
                    return _static_signature(source, alias.name, depth + 1)
    return None


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if node.level == 0:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _class_signature(node: ast.ClassDef, module_name, package, tree, depth) -> Signature | None:
    if any(_is_dataclass_decorator(d) for d in node.decorator_list):
        return None  # fields, not an __init__: let the import path read it
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            return _function_signature(item, skip_self=True)
    # No __init__ of its own: the first base class that can be read decides.
    for base in node.bases:
        base_name = ast.unparse(base)
        if "." in base_name:
            continue
        found = _static_signature(module_name, base_name, depth + 1)
        if found is not None:
            return found
    return None


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return ast.unparse(target).split(".")[-1] == "dataclass"


def _function_signature(node: ast.FunctionDef, skip_self: bool) -> Signature:
    args = node.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = []
    for arg, default in zip(positional, defaults):
        params.append((arg.arg, default is None, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append((arg.arg, default is None, inspect.Parameter.KEYWORD_ONLY))
    if args.kwarg is not None:
        params.append((args.kwarg.arg, False, inspect.Parameter.VAR_KEYWORD))
    if skip_self and params:
        params = params[1:]
    return _from_parameters(params)

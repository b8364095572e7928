"""Dotted command-line overrides (``--set a.b=3``) applied to a config tree: values are YAML
*data*, never code; list items are addressed by index (``students.0.model``)."""

from __future__ import annotations

from typing import Any

import yaml

from medistill.errors import ConfigError


def _index(node: list[Any], dotted: str, keys: list[str], i: int) -> int:
    """``keys[i]`` as an index of list ``node`` (the list ``keys[:i]`` names), or a ConfigError
    saying how list items are addressed."""
    k, where = keys[i], ".".join(keys[:i])
    try:
        n = int(k)
    except ValueError:
        raise ConfigError(f"override {dotted!r}: {where} is a list; address its items by index "
                          f"({where}.0{'.' + '.'.join(keys[i + 1:]) if keys[i + 1:] else ''}), not {k!r}") from None
    if not -len(node) <= n < len(node):
        raise ConfigError(f"override {dotted!r}: {where} has {len(node)} item(s) (0…{len(node) - 1}); "
                          f"there is no item {n}")
    return n


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if any(not k for k in keys):
        raise ConfigError(f"override {dotted!r}: empty key between dots")
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_index(node, dotted, keys, i)]
            continue
        node = node.setdefault(k, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i + 1])} is not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, dotted, keys, len(keys) - 1)] = value
    else:
        node[last] = value


Override = str | tuple[str, Any]


def parse_override(item: Override) -> tuple[str, Any]:
    """``a.b=3`` → ("a.b", 3). The value is parsed as YAML *data* (numbers, lists, bools).
    A ``(key, value)`` pair is taken as it is: command-line flags pass typed values, so
    ``--data 2024`` stays the string "2024" instead of becoming the number 2024."""
    if isinstance(item, tuple):
        return item
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        if raw.lstrip()[:1] in ("[", "{"):   # meant as a YAML list or mapping: say what is wrong with it
            problem = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise ConfigError(f"override {key.strip()}: {raw!r} is not a valid YAML list/mapping ({problem})") from None
        value = raw   # anything else that YAML cannot read is taken as the plain string the user typed
    return key.strip(), value


def override_key(item: Override) -> str:
    return item[0] if isinstance(item, tuple) else item.split("=", 1)[0].strip()


def apply_overrides(tree: dict[str, Any], items: list[Override]) -> None:
    """Apply ``key.sub=value`` overrides to a config tree in place (values parsed as YAML data)."""
    for item in items:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)

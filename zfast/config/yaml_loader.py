"""YAML in: the safe loader, strict about keys given twice, and its errors as one line.

Values carry no line numbers; a YAML syntax error says its line and column.
"""

from __future__ import annotations

import yaml

from zfast.config.problems import show


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML's safe loader, but a key given twice in one mapping is an error, not "last wins".

    libyaml's parser when PyYAML has it: the pure-Python one takes seconds on a file
    with 100,000 firewall rules."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {show(key)} is given twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
    if mark is None:
        return f"is not valid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: is not valid YAML: {problem}"

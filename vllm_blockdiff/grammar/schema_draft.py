"""A JSON schema read as `jsonschema` validates it: which keywords assert, how `$ref` resolves.

The schema rewrite (`schema_rewrite`) and the xgrammar gap analysis (`xgrammar_gaps`) must agree
with the validator that judges outputs (`coverage.output_errors`): the draft named by `$schema`
(2020-12 if none), its own keyword set (`dependencies` asserts in draft 7, not in 2020-12), and
its `$ref` rule (drafts 4-7 ignore a `$ref`'s siblings, 2019-09 on applies them).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import jsonschema

# Keywords that constrain one type of instance only; every other keyword applies to all types.
FAMILIES: dict[str, frozenset[str]] = {
    "number": frozenset({"multipleOf", "maximum", "exclusiveMaximum", "minimum",
                         "exclusiveMinimum", "divisibleBy"}),
    "string": frozenset({"maxLength", "minLength", "pattern", "format"}),
    "array": frozenset({"items", "additionalItems", "prefixItems", "maxItems", "minItems",
                        "uniqueItems", "contains", "maxContains", "minContains",
                        "unevaluatedItems"}),
    "object": frozenset({"maxProperties", "minProperties", "required", "properties",
                         "patternProperties", "additionalProperties", "dependencies",
                         "dependentRequired", "dependentSchemas", "propertyNames",
                         "unevaluatedProperties"}),
}
TYPES = ("object", "array", "string", "number", "boolean", "null")  # integer lies in number
# Formats some `jsonschema` release can check (given its optional packages); validators assert
# no other format, so any other `format` is an annotation.
SPEC_FORMATS = frozenset({
    "color", "date", "date-time", "duration", "email", "host-name", "hostname", "idn-email",
    "idn-hostname", "ip-address", "ipv4", "ipv6", "iri", "iri-reference", "json-pointer",
    "regex", "relative-json-pointer", "time", "uri", "uri-reference", "uri-template", "uuid"})
_SIBLINGS_IGNORED = (jsonschema.Draft3Validator, jsonschema.Draft4Validator,
                     jsonschema.Draft6Validator, jsonschema.Draft7Validator)


def _modifiers(cls: type) -> frozenset[str]:
    """Keywords `jsonschema` evaluates inside another one's validator (so absent from its
    `VALIDATORS`): they travel with that keyword."""
    out = {"then", "else"} if "if" in cls.VALIDATORS else set()
    if cls in (jsonschema.Draft3Validator, jsonschema.Draft4Validator):
        out |= {"exclusiveMinimum", "exclusiveMaximum"}  # flags on minimum / maximum
    if cls in (jsonschema.Draft201909Validator, jsonschema.Draft202012Validator):
        out |= {"minContains", "maxContains"}
    return frozenset(out)


def types_of(node: dict[str, Any]) -> list[str] | None:
    """The types `node`'s `type` keyword names (None: no type keyword, any type)."""
    t = node.get("type")
    if t is None:
        return None
    return [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)]


def intersect_types(a: list[str], b: set[str]) -> list[str]:
    """The types of `a` that `b` admits too, integer being a number (in `a`'s order)."""
    out = []
    for t in a:
        if t in b or (t == "integer" and "number" in b):
            out.append(t)
        elif t == "number" and "integer" in b:
            out.append("integer")
    return list(dict.fromkeys(out))


class Draft:
    """One root schema's draft: assertion keywords, local `$ref`s, validation of subschemas."""

    def __init__(self, root: Any):
        self.root = root
        self.cls = jsonschema.validators.validator_for(
            root, default=jsonschema.Draft202012Validator)
        self.keywords = frozenset(self.cls.VALIDATORS) | _modifiers(self.cls)
        self.ref_ignores_siblings = self.cls in _SIBLINGS_IGNORED
        self._validator = self.cls(root, format_checker=self.cls.FORMAT_CHECKER)

    def assertions(self, node: dict[str, Any]) -> dict[str, Any]:
        """The keywords of `node` the validator evaluates (`$ref` alone where it hides the rest);
        a `format` no validator checks is an annotation."""
        if "$ref" in node and self.ref_ignores_siblings:
            return {"$ref": node["$ref"]}
        out = {k: v for k, v in node.items() if k in self.keywords}
        if "format" in out and out["format"] not in SPEC_FORMATS:
            del out["format"]
        return out

    def resolve(self, ref: str) -> Any:
        """The subschema a local `$ref` ("#", "#/a/b") points to; LookupError otherwise."""
        if not isinstance(ref, str) or not ref.startswith("#") or (ref != "#" and
                                                                   not ref.startswith("#/")):
            raise LookupError(ref)
        node = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise LookupError(ref)
        return node

    def is_valid(self, instance: Any, schema: Any) -> bool:
        """`instance` against a subschema of the root (its `$ref`s resolve in the root)."""
        try:
            return self._validator.evolve(schema=schema).is_valid(instance)
        except Exception as e:  # foreign schemas: unresolvable $ref, patterns `re` rejects, ...
            raise LookupError(f"not usable for validation: {type(e).__name__}") from None

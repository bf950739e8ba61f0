"""Where xgrammar's grammar for a JSON schema may admit values the schema rejects.

xgrammar (0.2) compiles a schema object by one keyword family — `$ref`, else `const`, `enum`,
`anyOf`, `oneOf`, `allOf`, else `type` (or the object / array keywords), else any value — and
drops the object's other keywords without a warning, as it drops `not`, `if`, `uniqueItems`,
`contains`, `dependencies`, `required` names outside `properties`, a `pattern` or length beside a
`format` and a length beside a `pattern`; its format regexes are looser than `jsonschema`'s
checkers except for `email` and `uuid`. It warns about a few other approximations (`multipleOf`,
a `oneOf` it cannot prove disjoint, several `allOf` parts). `xgrammar_gaps` walks a schema as
xgrammar's parser does and names every such place (`schema_rewrite` removes most beforehand):
no gaps means xgrammar enforces the schema exactly, as far as this reading of xgrammar goes.
Restrictions are not gaps (strict mode's closed objects and arrays, patterns matched whole):
they never admit an invalid value.
"""

from __future__ import annotations

from typing import Any

from vllm_blockdiff.grammar.schema_draft import Draft, types_of
from vllm_blockdiff.grammar.schema_rewrite import (
    ARRAY_SHAPED,
    DISPATCH,
    MALFORMED,
    OBJECT_SHAPED,
    NotExact,
    Rewriter,
    bounded_optional_groups,
)

# Formats xgrammar writes as a regex (it ignores others) and those whose regex is no looser than
# `jsonschema`'s check (its dates admit February 31, its IPv4 addresses leading zeros, ...).
XGRAMMAR_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
EXACT_FORMATS = frozenset({"email", "uuid"})
# xgrammar's limits for `multipleOf` on integers (json_schema_converter.cc).
MULTIPLE_OF_MAX = 1024
MULTIPLE_OF_RANGE_MAX = 10000
_ANY_TYPE = frozenset({"not", "if", "then", "else", "disallow", "extends", "$dynamicRef",
                       "$recursiveRef"})


def xgrammar_gaps(schema: Any) -> tuple[str, ...]:
    """Each place ("<JSON pointer>: <what>") where xgrammar's grammar may admit what `schema`
    rejects; empty when it enforces the schema exactly."""
    if not isinstance(schema, dict):
        return ()
    try:
        walk = _Walk(Draft(schema))
        walk.node(schema, "")
    except (*MALFORMED, NotExact, RecursionError):
        return ("/: schema not analysable",)
    return tuple(dict.fromkeys(walk.gaps))


class _Walk:
    def __init__(self, draft: Draft):
        self.d = draft
        self.gaps: list[str] = []
        self._refs: set[str] = set()

    def gap(self, path: str, what: str) -> None:
        self.gaps.append(f"{path or '/'}: {what}")

    def node(self, node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return  # true; false fails to compile
        a = self.d.assertions(node)
        walks = (self._ref, None, None, self._branches, self._one_of, self._all_of)
        for key, walk in zip(DISPATCH, walks, strict=True):
            if key in a:
                ignored = sorted(k for k in a if k != key)
                if ignored:
                    self.gap(path, f"{', '.join(ignored)} beside {key} ignored")
                if walk is not None:
                    walk(a[key], f"{path}/{key}")
                return
        types = types_of(a)
        if types is None:
            types = (["object"] if OBJECT_SHAPED & a.keys() else
                     ["array"] if ARRAY_SHAPED & a.keys() else [])
            if not types and a:
                self.gap(path, f"{', '.join(sorted(a))} without type ignored")
        for key in sorted(_ANY_TYPE & a.keys()):
            self.gap(path, f"{key} ignored")
        for t in dict.fromkeys("number" if t == "integer" else t for t in types):
            check = getattr(self, f"_{t}", None)
            if check is not None:
                check(a, path, "integer" in types and "number" not in types)

    # -- dispatching keywords --------------------------------------------------------------------

    def _ref(self, ref: str, path: str) -> None:
        try:
            target = self.d.resolve(ref)
        except LookupError:
            self.gap(path, f"$ref {ref!r} outside the schema (any value)")
            return
        if ref not in self._refs:
            self._refs.add(ref)
            self.node(target, ref[1:])

    def _branches(self, branches: Any, path: str) -> None:
        for i, b in enumerate(branches if isinstance(branches, list) else ()):
            self.node(b, f"{path}/{i}")

    def _one_of(self, branches: Any, path: str) -> None:
        """xgrammar reads oneOf as anyOf: exact where no value it generates for one branch is
        valid against another."""
        options = branches if isinstance(branches, list) else []
        if not all(self._apart(x, y) for i, x in enumerate(options) for y in options[i + 1:]):
            self.gap(path, "oneOf not shown disjoint (read as anyOf)")
        self._branches(branches, path)

    def _apart(self, x: Any, y: Any) -> bool:
        """`x` and `y` admit no common value, or strict mode keeps them apart: each generates
        objects with its listed properties only, and the other requires one not listed."""
        rewriter = Rewriter(self.d)
        if rewriter.disjoint(x, y):
            return True
        try:
            x, y = rewriter.deref(x), rewriter.deref(y)
        except NotExact:
            return False
        return self._closed_without(x, y) and self._closed_without(y, x)

    def _closed_without(self, p: Any, q: Any) -> bool:
        if not isinstance(p, dict) or not isinstance(q, dict):
            return False
        a = self.d.assertions(p)
        objects_only = types_of(a) == ["object"] or (types_of(a) is None and
                                                     OBJECT_SHAPED & a.keys())
        closed = (a.get("additionalProperties", False) is False and not a.get("patternProperties")
                  and a.get("unevaluatedProperties", False) is False)
        if not objects_only or not closed or any(k in a for k in DISPATCH):
            return False
        listed = a.get("properties") if isinstance(a.get("properties"), dict) else {}
        required = q.get("required") if isinstance(q.get("required"), list) else []
        return any(name not in listed for name in required)

    def _all_of(self, parts: Any, path: str) -> None:
        if isinstance(parts, list) and len(parts) > 1:
            self.gap(path, "allOf of several schemas")
        self._branches(parts, path)

    # -- per type --------------------------------------------------------------------------------

    def _number(self, a: dict[str, Any], path: str, integer: bool) -> None:
        step = a.get("multipleOf")
        if step is None:
            return

        def numbers(*keys: str) -> list[float]:
            return [a[k] for k in keys
                    if isinstance(a.get(k), int | float) and not isinstance(a.get(k), bool)]

        lower = numbers("minimum", "exclusiveMinimum")
        upper = numbers("maximum", "exclusiveMaximum")
        in_range = (not lower and not upper) or (
            lower and upper and min(upper) - max(lower) <= MULTIPLE_OF_RANGE_MAX)
        if not (integer and numbers("multipleOf") and float(step).is_integer()
                and 0 < step <= MULTIPLE_OF_MAX and in_range):
            self.gap(path, "multipleOf ignored")

    def _string(self, a: dict[str, Any], path: str, _: bool) -> None:
        fmt, pattern = a.get("format"), a.get("pattern")
        lengths = sorted({"minLength", "maxLength"} & a.keys())
        if fmt is not None:
            if fmt not in EXACT_FORMATS:
                self.gap(path, f"format {fmt!r} " + ("looser than jsonschema's check"
                                                     if fmt in XGRAMMAR_FORMATS else "ignored"))
            if fmt in XGRAMMAR_FORMATS and (pattern is not None or lengths):
                self.gap(path, f"{', '.join(['pattern'] * (pattern is not None) + lengths)} "
                               "beside format ignored")
                return
        if isinstance(pattern, str):
            if lengths:
                self.gap(path, f"{', '.join(lengths)} beside pattern ignored")
            if bounded_optional_groups(pattern) != pattern:
                self.gap(path, "pattern with (...)? mis-compiled")

    def _array(self, a: dict[str, Any], path: str, _: bool) -> None:
        if a.get("uniqueItems") is True:
            self.gap(path, "uniqueItems ignored")
        if "contains" in a:
            self.gap(path, "contains ignored")
        if "unevaluatedItems" in a and "items" not in a:
            self.gap(path, "unevaluatedItems ignored")
        items = a.get("items")
        if isinstance(items, dict):
            self.node(items, f"{path}/items")
        for i, item in enumerate(a.get("prefixItems") or ()):
            self.node(item, f"{path}/prefixItems/{i}")

    def _object(self, a: dict[str, Any], path: str, _: bool) -> None:
        props = a.get("properties") if isinstance(a.get("properties"), dict) else {}
        required = a.get("required") if isinstance(a.get("required"), list) else []
        missing = [r for r in required if r not in props]
        if missing:
            self.gap(path, f"required {missing} outside properties not enforced")
        for key in ("dependencies", "dependentRequired", "dependentSchemas"):
            if a.get(key):
                self.gap(path, f"{key} ignored")
        if "unevaluatedProperties" in a and "additionalProperties" not in a and \
                a["unevaluatedProperties"] not in (True, {}):
            self.gap(path, "unevaluatedProperties ignored")
        patterns = a.get("patternProperties") or {}
        if len(patterns) > 1:
            self.gap(path, "several patternProperties (a name must match only one)")
        rewriter = Rewriter(self.d)
        for name in props if patterns else ():
            try:
                own = rewriter.deref(props[name])
                implied = rewriter.schema_of_property(a, name) in (props[name], own)
            except NotExact:
                implied = False
            if not implied:  # xgrammar applies the property's own schema only
                self.gap(path, f"property {name!r} also matches a patternProperties pattern")
        names = a.get("propertyNames")
        if names is not None and props:
            try:
                bad = [n for n in props if not self.d.is_valid(n, names)]
            except LookupError:
                bad = list(props)
            if bad:
                self.gap(path, f"properties {bad} outside propertyNames")
        for name, sub in props.items():
            self.node(sub, f"{path}/properties/{name}")
        for p, sub in patterns.items():
            self.node(sub, f"{path}/patternProperties/{p}")
        if isinstance(a.get("additionalProperties"), dict):
            self.node(a["additionalProperties"], f"{path}/additionalProperties")
        if isinstance(names, dict):
            self.node({"type": "string", **names}, f"{path}/propertyNames")

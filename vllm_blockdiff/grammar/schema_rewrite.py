"""JSON schemas rewritten into an equivalent form that grammar compilers enforce exactly.

xgrammar compiles a schema object by one keyword family — `$ref`, else `const`, `enum`, `anyOf`,
`oneOf`, `allOf`, else `type` — and silently drops the others: `{"type": "object", "required":
["url"], "anyOf": [{"required": ["md5"]}, ...]}` compiles to the bare `anyOf`, which admits `0`.
It never generates (nor requires) a `required` name missing from `properties`, and its string
patterns mis-compile an optional group around a repetition (`^a(-b+)?$` admits "ab").
llguidance refuses `oneOf` and formats it does not know. The rewrites below remove these cases
where the result is equivalent under the schema's draft as `jsonschema` reads it
(`schema_draft.Draft`):

- `const` / `enum` beside other keywords: the values those keywords accept;
- a `$ref`'s siblings: dropped where the draft ignores them, else merged with the target inlined;
- `allOf` merged into its parent; the parent's keywords merged into each `anyOf` / `oneOf`
  branch ({S, anyOf: [B, C]} = anyOf: [S∧B, S∧C]), unsatisfiable branches dropped;
- `oneOf` whose branches are pairwise disjoint (types, finite values, a required property the
  other branch forbids or gives other values) becomes `anyOf`;
- formats no validator checks dropped; `(...)?` in patterns written `(...){0,1}`;
- `required` names missing from `properties` listed there with the schema that applies to them,
  and listed properties given the `patternProperties` schemas their names match;
- a schema without `type` whose keywords xgrammar would drop lists every type (each type then
  reads its own keywords).

Merging two schemas is the union of their keywords except where keywords interact (`properties`
with `additionalProperties`, `items` with `prefixItems`, ...), each handled exactly or refused.
Anything not shown equivalent is left as it is; so is every schema whose `$ref`s point anywhere
but `#`, `#/definitions/<name>` or `#/$defs/<name>` (rewrites move subschemas).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import msgspec

from vllm_blockdiff.grammar.schema_draft import (
    FAMILIES,
    TYPES,
    Draft,
    intersect_types,
    types_of,
)
from vllm_blockdiff.grammar.spec import GrammarSpec

_SIMPLE_REF = re.compile(r"#|#/(definitions|\$defs)/[^/]+")
_UNSUPPORTED_KEYS = ("$dynamicRef", "$recursiveRef", "$anchor", "$dynamicAnchor",
                     "$recursiveAnchor")
# What reading a malformed schema raises (`"required": 3`, `"properties": []`, ...).
MALFORMED = (TypeError, ValueError, AttributeError, KeyError, LookupError)
MAX_GROWTH = 8  # a rewrite may inline definitions into branches, within this factor of size
_MAX_STEPS = 64  # local rewrites of one schema object
_MAX_INLINED = 256  # `$ref`s inlined per schema (recursive definitions stop here)
# Keywords whose values interact: merged as a group (see `Rewriter._merge_group`).
_GROUPS = (
    frozenset({"properties", "patternProperties", "additionalProperties"}),
    frozenset({"items", "additionalItems", "prefixItems"}),
    frozenset({"contains", "minContains", "maxContains"}),
    frozenset({"if", "then", "else"}),
)
_LEGACY_BOUNDS = (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum"))
_LOWER = frozenset({"minimum", "minLength", "minItems", "minProperties"})
_UPPER = frozenset({"maximum", "maxLength", "maxItems", "maxProperties"})
# xgrammar compiles a schema object by the first of these present, dropping its other keywords;
# without them, by `type`, else as an object / array if it has these keywords.
DISPATCH = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")
OBJECT_SHAPED = frozenset({"properties", "additionalProperties", "unevaluatedProperties"})
ARRAY_SHAPED = frozenset({"items", "prefixItems", "unevaluatedItems"})
# Subschema positions: a schema, a list of schemas, a map of schemas.
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not",
        "if", "then", "else", "unevaluatedItems", "unevaluatedProperties")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "dependentSchemas", "dependencies")
_CONTAINERS = ("definitions", "$defs")


class NotExact(Exception):
    """A rewrite that cannot be shown equivalent: the schema stays as it is."""


class _CannotMerge(Exception):
    """Two values of a keyword that do not combine into one exactly."""


class _Unsatisfiable(Exception):
    """Two values of a keyword no instance can satisfy together."""


def bounded_optional_groups(pattern: str) -> str:
    """`pattern` with every `(...)?` written `(...){0,1}`: the same regular expression, which
    xgrammar compiles correctly (it reads `(-[0-9]+)?` as admitting the digits alone)."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            # A "]" right after "[" or "[^" is a literal.
            lead = 2 if pattern[i + 1:i + 2] == "^" else 1
            if pattern[i + lead:i + lead + 1] == "]":
                out.append(pattern[i:i + lead + 1])
                i += lead + 1
                continue
        elif c == ")" and pattern[i + 1:i + 2] == "?":
            out.append("){0,1}")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def rewrite_schema(schema: Any) -> Any:
    """An equivalent schema that compilers enforce more exactly; `schema` itself (the same
    object) where nothing applies or a rewrite cannot be shown equivalent."""
    if not isinstance(schema, dict) or not _rewritable(schema):
        return schema
    try:
        out = Rewriter(Draft(schema)).schema(schema)
    except (NotExact, RecursionError):
        return schema
    except MALFORMED:  # keyword values of the wrong type: the compiler reports them
        return schema
    if out == schema:
        return schema
    if len(json.dumps(out)) > MAX_GROWTH * len(json.dumps(schema)) + 4096:
        return schema
    return out


def rewritten_spec(spec: GrammarSpec) -> GrammarSpec | None:
    """The JSON-schema spec with its schema rewritten (`rewritten` set); None if unchanged."""
    if spec.kind != "json":
        return None
    schema = json.loads(spec.source)
    out = rewrite_schema(schema)
    if out is schema:
        return None
    return msgspec.structs.replace(spec, source=json.dumps(out, ensure_ascii=False),
                                   rewritten=True)


def disjoint(draft: Draft, x: Any, y: Any) -> bool:
    """No value is valid against both subschemas of `draft`'s root (False: not shown)."""
    return Rewriter(draft).disjoint(x, y)


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _objects(v)
    elif isinstance(value, list):
        for v in value:
            yield from _objects(v)


def _rewritable(schema: dict[str, Any]) -> bool:
    """Only local `$ref`s to the root or to a root definition, no anchors or dynamic references,
    and no nested base URIs where anything is referenced: subschemas may then move freely."""
    refs = False
    for node in _objects(schema):
        if any(k in node for k in _UNSUPPORTED_KEYS):
            return False
        if "$ref" in node:
            refs = True
            if not isinstance(node["$ref"], str) or not _SIMPLE_REF.fullmatch(node["$ref"]):
                return False
    if refs:
        nested = (n for n in _objects(schema) if n is not schema)
        if any(isinstance(n.get("$id"), str) or isinstance(n.get("id"), str) for n in nested):
            return False
    return True


def _tighter_legacy_bound(ga: dict[str, Any], gb: dict[str, Any], bound: str, exclusive: str
                          ) -> dict[str, Any]:
    """Draft 4's bound with its boolean exclusive flag: the stricter of two (_CannotMerge where
    a flag stands without its bound or a value is not a number)."""
    sides = []
    for g in (ga, gb):
        value, flag = g.get(bound), g.get(exclusive, False)
        if not isinstance(value, int | float) or isinstance(value, bool) or \
                not isinstance(flag, bool):
            raise _CannotMerge
        sides.append((value, flag))
    sign = 1 if bound == "minimum" else -1
    value, flag = max(sides, key=lambda s: (sign * s[0], s[1]))
    return {bound: value, exclusive: True} if flag else {bound: value}


def _finite(node: Any) -> list[Any] | None:
    """The values a schema object allows at most (its `const` or `enum`), None if unbounded."""
    if not isinstance(node, dict):
        return None
    if "const" in node:
        return [node["const"]]
    enum = node.get("enum")
    return list(enum) if isinstance(enum, list) else None


class Rewriter:
    def __init__(self, draft: Draft):
        self.d = draft
        self.inlined = 0

    # -- the walk ----------------------------------------------------------------------------

    def schema(self, node: Any, depth: int = 0) -> Any:
        if not isinstance(node, dict):
            return node
        if depth > 64:
            raise NotExact("schema too deep")
        for _ in range(_MAX_STEPS):
            changed = self._step(node)
            if changed is None:
                break
            node = changed
        else:
            raise NotExact("rewrite does not settle")
        return self._children(node, depth)

    def _children(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        out = dict(node)
        active = self.d.assertions(node).keys() | set(_CONTAINERS)
        for key, value in node.items():
            if key not in active:
                continue
            if key in _LIST and isinstance(value, list):
                out[key] = [self.schema(v, depth + 1) for v in value]
            elif (key in _MAP or key in _CONTAINERS) and isinstance(value, dict):
                out[key] = {k: self.schema(v, depth + 1) for k, v in value.items()}
            elif key in _ONE:
                out[key] = self.schema(value, depth + 1)
        return out

    def _step(self, node: dict[str, Any]) -> dict[str, Any] | None:
        """One rewrite of this schema object, or None when none applies."""
        for rule in (self._drop_inert, self._filter_values, self._inline_ref, self._merge_all_of,
                     self._distribute, self._one_of_disjoint, self._patterns,
                     self._list_required, self._pattern_schemas, self._list_types):
            out = rule(node, self.d.assertions(node))
            if out is not None:
                return out
        return None

    # -- rules: each returns the rewritten object, or None -------------------------------------

    def _drop_inert(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        """Keywords the validator never evaluates here: a `$ref`'s siblings where the draft
        ignores them, formats no validator checks."""
        out = {k: v for k, v in node.items() if k in a or k not in self.d.keywords}
        return out if len(out) < len(node) else None

    def _filter_values(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        values = _finite(a)
        rest = {k: v for k, v in a.items() if k not in ("const", "enum")}
        if "const" in a and "enum" in a:
            rest["enum"] = a["enum"]
        if values is None or not rest:
            return None
        try:
            kept = [v for v in values if self.d.is_valid(v, rest)]
        except LookupError:
            return None
        if not kept:
            return None  # unsatisfiable: the compiler says so
        key = "const" if "const" in a else "enum"
        return {**self._annotations(node), key: kept[0] if key == "const" else kept}

    def _inline_ref(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        if "$ref" not in a or len(a) == 1:
            return None
        return self._replace(node, self.merge({k: v for k, v in a.items() if k != "$ref"},
                                               {"$ref": a["$ref"]}))

    def _merge_all_of(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        parts = a.get("allOf")
        if not isinstance(parts, list):
            return None
        merged: Any = {k: v for k, v in a.items() if k != "allOf"}
        for part in parts:
            merged = self.merge(merged, part)
            if merged is None:
                return None
        return self._replace(node, merged)

    def _distribute(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        for key in ("anyOf", "oneOf"):
            branches = a.get(key)
            if not isinstance(branches, list) or len(a) == 1:
                continue
            rest = {k: v for k, v in a.items() if k != key}
            merged = [self.merge(rest, b) for b in branches]
            if any(m is None for m in merged) or all(m is False for m in merged):
                return None
            return {**self._annotations(node), key: [m for m in merged if m is not False]}
        return None

    def _one_of_disjoint(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        branches = a.get("oneOf")
        if not isinstance(branches, list) or "anyOf" in node:
            return None
        if not all(self.disjoint(x, y) for i, x in enumerate(branches)
                   for y in branches[i + 1:]):
            return None
        return {("anyOf" if k == "oneOf" else k): v for k, v in node.items()}

    def _patterns(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        out = dict(node)
        if isinstance(a.get("pattern"), str):
            out["pattern"] = bounded_optional_groups(a["pattern"])
        if isinstance(a.get("patternProperties"), dict):
            out["patternProperties"] = {bounded_optional_groups(k): v
                                        for k, v in a["patternProperties"].items()}
        return out if out != node else None

    def _list_required(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        """A required name missing from `properties` gets the schema that applies to it there:
        the matching `patternProperties`, else `additionalProperties` (never one that is false:
        such an object cannot exist, and the compiler may say so)."""
        required, props = a.get("required"), a.get("properties", {})
        if not isinstance(required, list) or not isinstance(props, dict):
            return None
        missing = [r for r in required if isinstance(r, str) and r not in props]
        if not missing:
            return None
        added = {}
        for name in missing:
            schema = self._schema_of_name(a, name)
            if schema is None or schema is False:
                return None
            added[name] = {} if schema is True else schema
        return {**node, "properties": {**props, **added}}

    def _pattern_schemas(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        """A listed property whose name matches `patternProperties` must match their schemas
        too: merged into its own schema (compilers apply only that one)."""
        props, patterns = a.get("properties"), a.get("patternProperties")
        if not isinstance(props, dict) or not isinstance(patterns, dict) or not patterns:
            return None
        out = {}
        for name, schema in props.items():
            merged = self.schema_of_property(a, name)
            if merged is None:
                return None
            out[name] = merged if merged is not True else schema
        return {**node, "properties": out} if out != props else None

    def schema_of_property(self, a: dict[str, Any], name: str) -> Any:
        """The one schema a listed property `name` must match: its own merged with the
        `patternProperties` its name matches (None: not mergeable)."""
        merged, patterns = a["properties"][name], a.get("patternProperties")
        try:
            matched = [s for p, s in patterns.items() if re.search(p, name)]
        except (re.error, TypeError, AttributeError):
            return None
        for s in matched:
            merged = self.merge(merged, s)
            if merged is None:
                return None
        return merged

    def _list_types(self, node: dict[str, Any], a: dict[str, Any]) -> dict[str, Any] | None:
        shaped = (OBJECT_SHAPED | ARRAY_SHAPED) & a.keys()
        if "type" in a or any(k in a for k in DISPATCH) or shaped:
            return None
        if not any(k in family for family in FAMILIES.values() for k in a):
            return None
        return {**node, "type": list(TYPES)}

    # -- merging -------------------------------------------------------------------------------

    def _replace(self, node: dict[str, Any], merged: Any) -> dict[str, Any] | None:
        """`node`'s annotations with `merged`'s keywords (None when `merged` is not a usable
        object: no merge, or unsatisfiable, which the compiler reports better)."""
        if not isinstance(merged, dict):
            return None
        return {**self._annotations(node), **self.d.assertions(merged)}

    def _annotations(self, node: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in node.items() if k not in self.d.keywords}

    def deref(self, node: Any) -> Any:
        """`node` with a `$ref` replaced by its target (merged with its siblings where the draft
        applies them)."""
        while isinstance(node, dict) and "$ref" in node:
            self.inlined += 1
            if self.inlined > _MAX_INLINED:
                raise NotExact("recursive $ref")
            try:
                target = self.d.resolve(node["$ref"])
            except LookupError:
                raise NotExact("unresolvable $ref") from None
            siblings = {k: v for k, v in self.d.assertions(node).items() if k != "$ref"}
            node = target if not siblings else self.merge(siblings, target)
        return node

    def merge(self, a: Any, b: Any) -> Any:
        """A schema equivalent to `a` and `b` both holding; False if none can; None if this
        cannot be shown (a keyword on both sides that does not combine exactly)."""
        a, b = (self.deref(x) if isinstance(x, dict) and "$ref" in x else x for x in (a, b))
        if a is None or b is None:
            return None
        if a is False or b is False:
            return False
        if a is True or (isinstance(a, dict) and not self.d.assertions(a)):
            return b
        if b is True or (isinstance(b, dict) and not self.d.assertions(b)):
            return a
        if not isinstance(a, dict) or not isinstance(b, dict):
            return None
        try:
            return self._satisfiable(self._merge_keywords(self.d.assertions(a),
                                                          self.d.assertions(b)))
        except _CannotMerge:
            return None
        except _Unsatisfiable:
            return False

    def _merge_keywords(self, sa: dict[str, Any], sb: dict[str, Any]) -> dict[str, Any]:
        if "unevaluatedProperties" in sa.keys() | sb.keys() or \
                "unevaluatedItems" in sa.keys() | sb.keys():
            raise _CannotMerge  # depends on every adjacent keyword
        out = {**sa}
        groups = list(_GROUPS)
        for bound, exclusive in _LEGACY_BOUNDS:
            if isinstance(sa.get(exclusive), bool) or isinstance(sb.get(exclusive), bool):
                groups.append(frozenset({bound, exclusive}))  # draft 4: a flag on the bound
        for group in groups:
            ga, gb = ({k: v for k, v in s.items() if k in group} for s in (sa, sb))
            if ga and gb:
                merged = self._merge_group(ga, gb)
                for k in group:
                    out.pop(k, None)
                out.update(merged)
            elif gb:
                out.update(gb)
        grouped = frozenset().union(*groups)
        for key, vb in sb.items():
            if key in grouped:
                continue
            if key not in sa:
                out[key] = vb
                continue
            out[key] = self._merge_keyword(key, sa[key], vb)
        return out

    def _merge_keyword(self, key: str, va: Any, vb: Any) -> Any:
        """One keyword present on both sides: its combined value (raises _Unsatisfiable,
        _CannotMerge)."""
        if va == vb:
            return va
        if key == "type":
            ta = [va] if isinstance(va, str) else va
            tb = [vb] if isinstance(vb, str) else vb
            both = intersect_types(ta, set(tb))
            if not both:
                raise _Unsatisfiable
            return both[0] if len(both) == 1 else both
        if key == "required" and isinstance(va, list) and isinstance(vb, list):
            return list(dict.fromkeys(va + vb))
        if key in ("enum", "const"):
            values = [va] if key == "const" else va
            try:
                kept = [v for v in values if self.d.is_valid(v, {key: vb})]
            except LookupError:
                raise _CannotMerge from None
            if not kept:
                raise _Unsatisfiable
            return kept[0] if key == "const" else kept
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (va, vb))
        if numeric and key in _LOWER | {"exclusiveMinimum"}:
            return max(va, vb)
        if numeric and key in _UPPER | {"exclusiveMaximum"}:
            return min(va, vb)
        if key == "uniqueItems" and isinstance(va, bool) and isinstance(vb, bool):
            return va or vb
        if key == "allOf" and isinstance(va, list) and isinstance(vb, list):
            return va + vb
        if key in ("dependencies", "dependentRequired", "dependentSchemas") and \
                isinstance(va, dict) and isinstance(vb, dict) and not va.keys() & vb.keys():
            return {**va, **vb}
        if key == "propertyNames":
            return self._merged(va, vb)
        raise _CannotMerge

    def _merged(self, a: Any, b: Any) -> Any:
        """`merge` of two subschemas (a False result is a schema here, not unsatisfiable)."""
        merged = self.merge(a, b)
        if merged is None:
            raise _CannotMerge
        return merged

    def _merge_group(self, ga: dict[str, Any], gb: dict[str, Any]) -> dict[str, Any]:
        """Interacting keywords present on both sides, merged (raises _CannotMerge)."""
        if ga == gb:
            return ga
        if ga.keys() | gb.keys() <= {"properties", "additionalProperties"}:
            return self._merge_properties(ga, gb)
        if ga.keys() == gb.keys() == {"items"} and not isinstance(ga["items"], list) and \
                not isinstance(gb["items"], list):
            return {"items": self._merged(ga["items"], gb["items"])}
        for bound, exclusive in _LEGACY_BOUNDS:
            if ga.keys() | gb.keys() <= {bound, exclusive}:
                return _tighter_legacy_bound(ga, gb, bound, exclusive)
        raise _CannotMerge

    def _merge_properties(self, ga: dict[str, Any], gb: dict[str, Any]) -> dict[str, Any]:
        """Each name gets both sides' schemas for it (a side's `additionalProperties` where it
        does not list the name), other names both `additionalProperties`."""
        pa, pb = ga.get("properties", {}), gb.get("properties", {})
        apa, apb = ga.get("additionalProperties", True), gb.get("additionalProperties", True)
        if not isinstance(pa, dict) or not isinstance(pb, dict):
            raise _CannotMerge
        additional = self._merged(apa, apb)
        props = {}
        for name in dict.fromkeys([*pa, *pb]):
            merged = self._merged(pa.get(name, apa), pb.get(name, apb))
            if merged is not False or additional is not False:  # else: additional forbids it
                props[name] = merged
        out: dict[str, Any] = {"properties": props} if props else {}
        if "additionalProperties" in ga or "additionalProperties" in gb:
            out["additionalProperties"] = additional
        return out

    def _satisfiable(self, node: dict[str, Any]) -> dict[str, Any] | bool:
        """False where `node` admits objects only and forbids a property it requires."""
        required = node.get("required")
        if types_of(node) != ["object"] or not isinstance(required, list):
            return node
        if any(self._forbids(node, name) for name in required if isinstance(name, str)):
            return False
        return node

    def _schema_of_name(self, a: dict[str, Any], name: str) -> Any:
        """The schema a property `name` not in `properties` must match (None: not known)."""
        patterns = a.get("patternProperties") or {}
        try:
            matched = [s for p, s in patterns.items() if re.search(p, name)]
        except (re.error, TypeError):
            return None
        if not matched:
            return a.get("additionalProperties", True)
        schema: Any = True
        for s in matched:
            schema = self.merge(schema, s)
            if schema is None:
                return None
        return schema

    def _forbids(self, node: dict[str, Any], name: str) -> bool:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            return False
        if name in props:
            return props[name] is False
        return node.get("additionalProperties", True) is False and \
            not node.get("patternProperties")

    def disjoint(self, x: Any, y: Any) -> bool:
        """No instance is valid against both (False: not shown)."""
        try:
            x, y = self.deref(x), self.deref(y)
        except NotExact:
            return False
        if x is False or y is False:
            return True
        if not isinstance(x, dict) or not isinstance(y, dict):
            return False
        tx, ty = types_of(x), types_of(y)
        if tx is not None and ty is not None and not intersect_types(tx, set(ty)):
            return True
        for p, q in ((x, y), (y, x)):
            if self._finite_outside(p, q):
                return True
        if ["object"] not in (tx, ty):
            return False
        for p, q in ((x, y), (y, x)):  # both hold objects only: compare properties
            for name in p.get("required", []) if isinstance(p.get("required"), list) else ():
                if not isinstance(name, str):
                    continue
                if self._forbids(q, name):
                    return True
                sp, sq = (s.get("properties", {}).get(name) for s in (p, q))
                if name in q.get("required", ()) and sq is not None and \
                        self._finite_outside(self.deref(sp), sq):
                    return True
        return False

    def _finite_outside(self, p: Any, q: Any) -> bool:
        """`p` allows finitely many values and `q` accepts none of them."""
        values = _finite(p)
        if values is None:
            return False
        try:
            return not any(self.d.is_valid(v, q) for v in values)
        except LookupError:
            return False

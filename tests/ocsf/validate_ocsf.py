#!/usr/bin/env python3
"""Validates metapass audit events against the real OCSF schema files.

Usage: validate_ocsf.py SCHEMA_DIR EVENTS.jsonl...

SCHEMA_DIR is a checkout of the ocsf/ocsf-schema repository at the tag the events declare in
metadata.version (its dictionary.json, objects/, events/, profiles/). Every event is checked
against the class its class_uid names, with the profiles its metadata.profiles declares:

- no attribute the class, an object or an enabled profile does not define;
- every value of the type the dictionary gives (strings, integers, booleans, objects, arrays);
- every enumerated value (activity_id, severity_id, status_id, type_id, ...) in its enum;
- every required attribute present, and each object's constraints (at_least_one, just_one) met;
- the `*_dt` siblings of timestamps only with the datetime profile.

Prints one line per problem and exits 1 if there is any. The standard library only: the schema
files are the reference, not a third-party reading of them.
"""

import json
import os
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Schema:
    def __init__(self, root):
        self.root = root
        self.dictionary = load(os.path.join(root, "dictionary.json"))
        self.attributes = self.dictionary["attributes"]
        self.types = self.dictionary["types"]["attributes"]
        self.objects = {}
        for directory, _, files in os.walk(os.path.join(root, "objects")):
            for name in files:
                if name.endswith(".json"):
                    obj = load(os.path.join(directory, name))
                    self.objects[obj["name"]] = obj
        self.events = {}
        for directory, _, files in os.walk(os.path.join(root, "events")):
            for name in files:
                if name.endswith(".json"):
                    event = load(os.path.join(directory, name))
                    self.events[event["name"]] = event
        self.categories = load(os.path.join(root, "categories.json"))["attributes"]
        self.profiles = {}
        for name in os.listdir(os.path.join(root, "profiles")):
            if name.endswith(".json"):
                profile = load(os.path.join(root, "profiles", name))
                self.profiles[profile["name"]] = profile

    def included(self, definition):
        """The attributes a definition pulls in with $include (profiles or shared files)."""
        out = {}
        includes = definition.get("attributes", {}).get("$include", [])
        if isinstance(includes, str):
            includes = [includes]
        for path in includes:
            part = load(os.path.join(self.root, path))
            profile = part.get("name") if part.get("meta") == "profile" else None
            for name, attr in part.get("attributes", {}).items():
                if name == "$include":
                    continue
                attr = dict(attr)
                if profile and "profile" not in attr:
                    attr["profile"] = profile
                out[name] = attr
        return out

    def merged(self, definition, kind):
        """Attributes of a class or object, with what it extends and includes."""
        parent = {}
        base = definition.get("extends")
        if base:
            source = self.events if kind == "event" else self.objects
            if base in source:
                parent = self.merged(source[base], kind)
        attrs = dict(parent)
        overlays = list(self.included(definition).items())
        overlays += [(n, a) for n, a in definition.get("attributes", {}).items() if n != "$include"]
        for name, attr in overlays:
            merged = {**attrs.get(name, {}), **attr}
            # An enum in a class or object extends the one it inherits (0 Unknown, 99 Other).
            if "enum" in attrs.get(name, {}) and "enum" in attr:
                merged["enum"] = {**attrs[name]["enum"], **attr["enum"]}
            attrs[name] = merged
        return attrs

    def class_by_uid(self, uid):
        for event in self.events.values():
            if "uid" not in event or event.get("name") == "base_event":
                continue
            category = event.get("category")
            if category is None:
                parent = self.events.get(event.get("extends"), {})
                category = parent.get("category")
            if category not in self.categories:
                continue
            if self.categories[category]["uid"] * 1000 + event["uid"] == uid:
                return event, self.categories[category]["uid"]
        return None, None


class Validator:
    def __init__(self, schema, profiles):
        self.schema = schema
        self.profiles = set(profiles)
        self.problems = []

    def problem(self, where, what):
        self.problems.append(f"{where}: {what}")

    def definition(self, name, local):
        """The dictionary's definition of attribute `name` overlaid with the local one."""
        return {**self.schema.attributes.get(name, {}), **local}

    def check_object(self, value, attrs, where, constraints=None):
        if not isinstance(value, dict):
            self.problem(where, f"expected an object, found {type(value).__name__}")
            return
        allowed = {}
        for name, attr in attrs.items():
            profile = attr.get("profile")
            if profile and profile not in self.profiles:
                continue
            allowed[name] = attr
        for name, item in value.items():
            if name.endswith("_dt") and "datetime" in self.profiles:
                base = allowed.get(name[:-3])
                if base is not None and self.definition(name[:-3], base).get("type") == "timestamp_t":
                    self.check_scalar(item, "datetime_t", f"{where}.{name}")
                    continue
            if name not in allowed:
                self.problem(where, f"unknown attribute {name!r}")
                continue
            self.check_value(item, name, allowed[name], f"{where}.{name}")
        for name, attr in allowed.items():
            if attr.get("requirement") == "required" and name not in value:
                self.problem(where, f"required attribute {name!r} is missing")
        for rule, names in (constraints or {}).items():
            present = [n for n in names if n in value]
            if rule == "at_least_one" and not present:
                self.problem(where, f"constraint at_least_one of {names} not met")
            if rule == "just_one" and len(present) != 1:
                self.problem(where, f"constraint just_one of {names} not met ({present})")

    def check_value(self, value, name, local, where):
        definition = self.definition(name, local)
        kind = definition.get("type")
        if definition.get("is_array"):
            if not isinstance(value, list):
                self.problem(where, "expected an array")
                return
            for i, item in enumerate(value):
                self.check_one(item, kind, definition, f"{where}[{i}]")
            return
        self.check_one(value, kind, definition, where)

    def check_one(self, value, kind, definition, where):
        # `object` (unmapped and the like) is OCSF's open object: any members.
        if kind == "object":
            if not isinstance(value, dict):
                self.problem(where, "expected an object")
            return
        if kind in self.schema.objects:
            obj = self.schema.objects[kind]
            attrs = self.schema.merged(obj, "object")
            self.check_object(value, attrs, where, obj.get("constraints"))
            return
        if kind == "object_t" or kind == "json_t":
            return
        self.check_scalar(value, kind, where)
        enum = definition.get("enum")
        # The uids of the class itself are derived from the class (checked in validate()).
        derived = where.rsplit(".", 1)[-1] in ("class_uid", "category_uid", "type_uid")
        if enum is not None and not derived and str(value) not in enum:
            self.problem(where, f"value {value!r} is not in the enum ({sorted(enum)[:12]})")

    def base_type(self, kind):
        seen = set()
        while kind in self.schema.types and kind not in seen:
            seen.add(kind)
            parent = self.schema.types[kind].get("type")
            if not parent or parent == kind:
                break
            kind = parent
        return kind

    def check_scalar(self, value, kind, where):
        base = self.base_type(kind)
        ok = {
            "string_t": isinstance(value, str),
            "integer_t": isinstance(value, int) and not isinstance(value, bool),
            "long_t": isinstance(value, int) and not isinstance(value, bool),
            "float_t": isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean_t": isinstance(value, bool),
        }.get(base)
        if ok is None:
            self.problem(where, f"unknown type {kind!r}")
        elif not ok:
            self.problem(where, f"expected {kind} ({base}), found {value!r}")


def validate(schema, event, where):
    version = event.get("metadata", {}).get("version")
    declared = load(os.path.join(schema.root, "version.json"))["version"]
    problems = []
    if version != declared:
        problems.append(f"{where}: declares OCSF {version!r}, the schema is {declared!r}")
    cls, category_uid = schema.class_by_uid(event.get("class_uid"))
    if cls is None:
        return problems + [f"{where}: no class with class_uid {event.get('class_uid')!r}"]
    profiles = event.get("metadata", {}).get("profiles", [])
    validator = Validator(schema, profiles)
    for profile in profiles:
        if profile not in schema.profiles:
            validator.problem(where, f"unknown profile {profile!r}")
    attrs = schema.merged(cls, "event")
    for profile in profiles:
        for name, attr in schema.profiles.get(profile, {}).get("attributes", {}).items():
            attrs.setdefault(name, {**attr, "profile": profile})
    validator.check_object(event, attrs, where, cls.get("constraints"))
    if event.get("category_uid") != category_uid:
        validator.problem(where, f"category_uid {event.get('category_uid')} is not {category_uid}")
    expected_type = event.get("class_uid", 0) * 100 + event.get("activity_id", -1)
    if event.get("type_uid") != expected_type:
        validator.problem(where, f"type_uid {event.get('type_uid')} is not {expected_type}")
    return problems + validator.problems


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    schema = Schema(sys.argv[1])
    problems = []
    count = 0
    for path in sys.argv[2:]:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                count += 1
                event = json.loads(line)
                operation = event.get("api", {}).get("operation", "?")
                problems += validate(schema, event, f"{os.path.basename(path)}:{number} ({operation})")
    for problem in problems:
        print(problem)
    print(f"{count} events checked against OCSF {load(os.path.join(schema.root, 'version.json'))['version']}: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

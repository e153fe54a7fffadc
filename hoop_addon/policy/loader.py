"""Load `rules/*.yaml` into a `Policy`, or fail with the file, line and key at fault.

Loading is all-or-nothing: every file is parsed and every cross-reference resolved
before a `Policy` is returned, so a gateway never runs half a rule set. Unknown keys
are errors (with a did-you-mean hint), because a typo in a security policy must not
silently drop a rule.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonpath_rfc9535
import re2
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hoop_addon.identity.verifier import key_url_allowed
from hoop_addon.masking.detectors import BUILTIN, Detector, DetectorError, iban_valid, luhn_valid, ssn_valid
from hoop_addon.policy.model import (
    DEFAULT_OUTPUT_TOKENS, ApprovalRule, BlockRule, Conditions, Credential, Issuer, Limit, MaskRule, McpPolicy, Names,
    Policy, RecordingPolicy, Route, ToolRule,
)
from hoop_addon.providers.aws import AwsSigV4
from hoop_addon.providers.errors import APIS

ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
TOKEN_SOURCES = ("authorization", "proxy_password", "proxy_bearer", "x_api_key")
VALIDATORS: dict[str, Callable[[str], bool]] = {"luhn": luhn_valid, "us_ssn": ssn_valid, "iban": iban_valid}
OPERATORS = ("redact", "partial", "hash", "tokenize")
# A secret reference: ${ENV_VAR}, or ${file:PATH} (PATH relative to the policy file).
_SECRET_REF = re.compile(r"\$\{(?:([A-Za-z_][A-Za-z0-9_]*)|file:([^}]+))\}")
MAX_SECRET_FILE_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PolicyError(Exception):
    """A policy file is invalid. `str()` is `FILE:LINE: KEY: MESSAGE`.

    Attributes: `file` (str path), `line` (1-based int; 0 when the problem is the file
    itself, and then left out of the message), `key` (dotted path such as
    `routes[0].match.hosts`), `message` (str).
    """

    def __init__(self, file: str, line: int, key: str, message: str) -> None:
        super().__init__(f"{file}:{line}: {key}: {message}" if line else f"{file}: {message}")
        self.file, self.line, self.key, self.message = file, line, key, message


@dataclass(frozen=True, slots=True)
class _Loc:
    file: str
    dir: Path
    key: str

    def at(self, key: str | int) -> _Loc:
        if isinstance(key, int):
            return _Loc(self.file, self.dir, f"{self.key}[{key}]")
        return _Loc(self.file, self.dir, f"{self.key}.{key}" if self.key else key)

    def error(self, node: Node, message: str) -> PolicyError:
        return PolicyError(self.file, node.start_mark.line + 1, self.key or "(top)", message)


class _Map:
    """A YAML mapping node read key by key; `finish()` rejects keys nobody read."""

    def __init__(self, node: Node, loc: _Loc) -> None:
        if not isinstance(node, MappingNode):
            raise loc.error(node, f"expected a mapping, got {_kind(node)}")
        self.mapping, self.loc = node, loc
        self.items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                raise loc.error(key_node, "keys must be plain strings")
            if key in self.items:
                raise loc.at(key).error(key_node, "duplicate key")
            self.items[key] = (key_node, value_node)
        self.read: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.items

    def node(self, key: str) -> Node:
        self.read.add(key)
        if key not in self.items:
            unread = [k for k in self.items if k not in self.read]
            if typo := difflib.get_close_matches(key, unread, n=1):
                raise self.loc.at(typo[0]).error(self.items[typo[0]][0], f"unknown key (did you mean '{key}'?)")
            raise self.loc.at(key).error(self.mapping, "required key is missing")
        return self.items[key][1]

    def text(self, key: str, default: str | None = None) -> str:
        if default is not None and key not in self.items:
            self.read.add(key)
            return default
        return _scalar(self.node(key), self.loc.at(key), str)

    def integer(self, key: str, default: int) -> int:
        if key not in self.items:
            self.read.add(key)
            return default
        return _scalar(self.node(key), self.loc.at(key), int)

    def texts(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """A list of strings; a single string is accepted as a one-item list."""
        if default is not None and key not in self.items:
            self.read.add(key)
            return default
        node, loc = self.node(key), self.loc.at(key)
        if isinstance(node, ScalarNode):
            return (_scalar(node, loc, str),)
        return tuple(_scalar(n, loc.at(i), str) for i, n in _seq(node, loc))

    def where(self, key: str) -> Node:
        """The value node of `key` if present, else the mapping: where to point an error."""
        return self.items[key][1] if key in self.items else self.mapping

    def listed(self, key: str) -> list[tuple[str, _Loc, Node]]:
        """Like `texts`, but each item with its location and node, to point errors at it."""
        if key not in self.items:
            self.read.add(key)
            return []
        node, loc = self.node(key), self.loc.at(key)
        if isinstance(node, ScalarNode):
            return [(_scalar(node, loc, str), loc, node)]
        return [(_scalar(n, loc.at(i), str), loc.at(i), n) for i, n in _seq(node, loc)]

    def sub(self, key: str) -> _Map:
        return _Map(self.node(key), self.loc.at(key))

    def finish(self, allowed: tuple[str, ...] | None = None) -> None:
        for key, (key_node, _) in self.items.items():
            if key not in self.read:
                hint = difflib.get_close_matches(key, allowed or tuple(self.read), n=1)
                suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise self.loc.at(key).error(key_node, f"unknown key{suffix}")


def _kind(node: Node) -> str:
    return {MappingNode: "a mapping", SequenceNode: "a list"}.get(type(node), "a scalar")


_CONSTRUCTOR = yaml.SafeLoader("")


def _scalar[T](node: Node, loc: _Loc, kind: type[T]) -> T:
    if not isinstance(node, ScalarNode):
        raise loc.error(node, f"expected {kind.__name__}, got {_kind(node)}")
    try:
        value = _CONSTRUCTOR.construct_object(node)
    except (ValueError, TypeError, AttributeError, OverflowError, yaml.YAMLError) as exc:
        # an explicit tag the value does not fit (`!!int abc`, `!!timestamp x`) or an
        # unknown one: a policy error with file:line:key, never a raw exception that
        # would end `policy check` in a traceback or the hot-reload watcher
        detail = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc) or type(exc).__name__
        raise loc.error(node, f"invalid {node.tag.removeprefix('tag:yaml.org,2002:')} value {node.value!r}: {detail}") from None
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = node.value  # a bare 443 is a fine host/path/name string
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise loc.error(node, f"expected {kind.__name__}, got {type(value).__name__}")
    if kind is str and not value:
        raise loc.error(node, "must not be empty")
    return value


def _seq(node: Node, loc: _Loc) -> Iterator[tuple[int, Node]]:
    if not isinstance(node, SequenceNode):
        raise loc.error(node, f"expected a list, got {_kind(node)}")
    return enumerate(node.value)


def _choice(value: str, choices: tuple[str, ...], loc: _Loc, node: Node) -> str:
    if value not in choices:
        raise loc.error(node, f"'{value}' is not one of: {', '.join(choices)}")
    return value


def _name(m: _Map, seen: dict[str, str], what: str) -> str:
    name = m.text("name")
    node = m.node("name")
    if not _NAME.match(name):
        raise m.loc.at("name").error(node, "use letters, digits, '_', '-', '.' (max 64)")
    if name in seen:
        raise m.loc.at("name").error(node, f"duplicate {what} name '{name}' (first in {seen[name]})")
    seen[name] = f"{m.loc.file}:{node.start_mark.line + 1}"
    return name


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise PolicyError(str(path), 0, "(dir)", "no *.yaml policy files here")
        return files
    if not path.is_file():
        raise PolicyError(str(path), 0, "(path)", "no such policy file or directory")
    return [path]


def _compose(path: Path) -> Node | None:
    try:
        return yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except OSError as exc:
        raise PolicyError(str(path), 0, "(file)", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PolicyError(str(path), 0, "(file)", "not UTF-8 text") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        raise PolicyError(str(path), line, "(yaml)", f"{exc.problem or exc.context}") from None


def load_policy(path: str | os.PathLike[str], *, resolve_env: bool = True) -> Policy:
    """Load a policy file, or every `*.yaml`/`*.yml` of a directory in name order.

    With `resolve_env`, `${VAR}` references in credentials are replaced with the
    environment's values (a missing variable is an error); without it (for
    `policy check` in CI, where secrets are absent) they are only validated.

    Returns a `Policy`. Raises `PolicyError` naming the file, line and key of the first
    problem: YAML syntax, unknown or duplicate key, wrong type, invalid RE2 pattern or
    RFC 9535 JSONPath, unknown detector or rule, duplicate name, literal secret.
    """
    files = _files(Path(path))
    digest = hashlib.sha256()
    docs: list[_Map] = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:  # e.g. deleted or replaced between listing and reading
            raise PolicyError(str(file), 0, "(file)", f"cannot read: {exc.strerror or exc}") from None
        digest.update(file.name.encode() + b"\0" + data + b"\0")
        node = _compose(file)
        if node is None:
            continue  # an empty file contributes nothing
        doc = _Map(node, _Loc(str(file), file.parent.resolve(), ""))
        if doc.integer("version", 1) != 1:
            raise doc.loc.at("version").error(doc.node("version"), "only version 1 is supported")
        docs.append(doc)

    def sections(key: str) -> Iterator[tuple[int, _Map]]:
        for doc in docs:
            if doc.has(key):
                for i, node in _seq(doc.node(key), doc.loc.at(key)):
                    yield i, _Map(node, doc.loc.at(key).at(i))

    def single(key: str) -> _Map | None:
        found = [d for d in docs if d.has(key)]
        if len(found) > 1:
            raise found[1].loc.at(key).error(
                found[1].items[key][0], f"'{key}' is already set in {found[0].loc.file}"
            )
        return found[0].sub(key) if found else None

    names: dict[str, str] = {}
    issuers = tuple(_issuer(m, names) for _, m in sections("issuers"))
    detectors = dict(BUILTIN)
    names = {}
    for _, m in sections("detectors"):
        detector = _detector(m, names)
        if detector.name in BUILTIN:
            raise m.loc.at("name").error(m.node("name"), "shadows a built-in detector")
        detectors[detector.name] = detector
    names = {}
    rules = {r.name: r for r in (_mask_rule(m, names, detectors) for _, m in sections("masking"))}
    names = {}
    by_name = {i.name: i.issuer for i in issuers}  # what `<issuer name>:<name>` refers to
    mcp_names: dict[str, str] = {}  # MCP rule names: one namespace with block and approval rules
    routes = tuple(_route(m, names, rules, resolve_env, by_name, mcp_names) for _, m in sections("routes"))
    route_names = {r.name for r in routes}
    names = dict(mcp_names)
    block_rules = tuple(_block_rule(m, names, route_names, by_name) for _, m in sections("block"))
    approval_rules = tuple(_approval_rule(m, names, route_names, by_name) for _, m in sections("approvals"))
    names = {}
    limits = tuple(_limit(m, names, route_names, by_name) for _, m in sections("limits"))

    token_sources: tuple[str, ...] = TOKEN_SOURCES
    if identity := single("identity"):
        token_sources = tuple(_choice(v, TOKEN_SOURCES, loc, n) for v, loc, n in identity.listed("token_sources"))
        identity.finish()
    unmatched = "deny"
    max_pending = 100
    if defaults := single("defaults"):
        unmatched = _choice(defaults.text("unmatched", "deny"), ("deny", "allow"), defaults.loc.at("unmatched"), defaults.where("unmatched"))
        max_pending = defaults.integer("max_pending", 100)
        if not 1 <= max_pending <= 100_000:
            raise defaults.loc.at("max_pending").error(defaults.node("max_pending"), "must be 1..100000")
        defaults.finish()
    recording = _recording(single("recording"), single("audit"))
    for doc in docs:
        doc.finish(("version", "issuers", "identity", "defaults", "detectors", "masking", "routes", "block", "approvals", "recording", "audit", "limits"))
    if routes and not issuers:
        raise PolicyError(str(files[0]), 1, "issuers", "routes need at least one trusted issuer")
    return Policy(
        files=tuple(str(f) for f in files),
        digest=digest.hexdigest(),
        issuers=issuers,
        token_sources=frozenset(token_sources),  # type: ignore[arg-type]
        unmatched=unmatched,  # type: ignore[arg-type]
        routes=routes,
        block_rules=block_rules,
        approval_rules=approval_rules,
        max_pending=max_pending,
        recording=recording,
        limits=limits,
    )


def _issuer(m: _Map, names: dict[str, str]) -> Issuer:
    name = _name(m, names, "issuer")
    issuer_url = m.text("issuer")
    jwks: str | None = None
    if m.has("jwks"):
        jwks_node, jwks = m.node("jwks"), m.text("jwks")
        if jwks.startswith(("http://", "https://")):
            _check_url(jwks, m.loc.at("jwks"), jwks_node)
        else:
            jwks = str((m.loc.dir / jwks.removeprefix("file:")).resolve())
    elif issuer_url.startswith(("http://", "https://")):
        _check_url(issuer_url, m.loc.at("issuer"), m.node("issuer"))  # OIDC discovery from the issuer
    else:
        raise m.loc.at("jwks").error(m.mapping, "required unless the issuer is a URL (then OIDC discovery is used)")
    algorithms = tuple(_choice(v, ALGORITHMS, loc, n) for v, loc, n in m.listed("algorithms")) or ("RS256", "ES256")
    leeway = m.integer("leeway", 30)
    if not 0 <= leeway <= 300:
        raise m.loc.at("leeway").error(m.node("leeway"), "must be 0..300 seconds")
    cooldown = m.integer("refetch_cooldown", 30)
    if not 1 <= cooldown <= 3600:
        raise m.loc.at("refetch_cooldown").error(m.node("refetch_cooldown"), "must be 1..3600 seconds")
    issuer = Issuer(
        name=name,
        issuer=issuer_url,
        audiences=m.texts("audience"),
        jwks=jwks,
        algorithms=algorithms,
        groups_claim=m.text("groups_claim", "groups"),
        leeway=leeway,
        token_type=m.text("typ") if m.has("typ") else None,
        refetch_cooldown=cooldown,
        client_id_claim=m.text("client_id_claim") if m.has("client_id_claim") else None,
    )
    m.finish()
    return issuer


def _check_url(url: str, loc: _Loc, node: Node) -> None:
    if not key_url_allowed(url):
        raise loc.error(node, "JWKS over plain http is only allowed on loopback")


def _detector(m: _Map, names: dict[str, str]) -> Detector:
    name = _name(m, names, "detector")
    validator = None
    if m.has("validator"):
        vnode = m.node("validator")
        validator = VALIDATORS[_choice(m.text("validator"), tuple(VALIDATORS), m.loc.at("validator"), vnode)]
    keywords = tuple(k.lower() for k in m.texts("keywords", ()))
    window = m.integer("window", 40)
    if not 1 <= window <= 1000:
        raise m.loc.at("window").error(m.node("window"), "must be 1..1000 characters")
    max_length = m.integer("max_length", 0) or None
    if max_length is not None and not 1 <= max_length <= 4096:
        raise m.loc.at("max_length").error(m.node("max_length"), "must be 1..4096 characters")
    try:
        detector = Detector(name, m.text("label", name.upper()), m.text("pattern"), validator, keywords, window, max_length)
    except DetectorError as exc:
        raise m.loc.at("pattern").error(m.node("pattern"), str(exc)) from None
    m.finish()
    return detector


def _mask_rule(m: _Map, names: dict[str, str], detectors: dict[str, Detector]) -> MaskRule:
    name = _name(m, names, "masking rule")
    direction = _choice(m.text("direction", "both"), ("request", "response", "both"), m.loc.at("direction"), m.where("direction"))
    paths = []
    for text, loc, node in m.listed("paths"):
        paths.append((text, _jsonpath(text, loc, node)))
    attributes = m.listed("otlp_attributes")
    if m.has("otlp_attributes") and not attributes:
        raise m.loc.at("otlp_attributes").error(m.node("otlp_attributes"), "name at least one attribute key")
    for glob, loc, node in attributes:
        text = otlp_attribute_path(glob, loc, node)
        paths.append((text, _jsonpath(text, loc, node)))
    chosen = []
    for det, loc, node in m.listed("detectors"):
        if det not in detectors:
            hint = difflib.get_close_matches(det, detectors, n=1)
            suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise loc.error(node, f"unknown detector '{det}'{suffix}")
        chosen.append(detectors[det])
    if not chosen:
        raise m.loc.at("detectors").error(m.where("detectors"), "name at least one detector")
    operator = _choice(m.text("operator", "redact"), OPERATORS, m.loc.at("operator"), m.where("operator"))
    keep = m.integer("keep", 4)
    if not 0 <= keep <= 64:
        raise m.loc.at("keep").error(m.node("keep"), "must be 0..64 characters")
    on_invalid = _choice(m.text("on_invalid_json", "block"), ("block", "text"), m.loc.at("on_invalid_json"), m.where("on_invalid_json"))
    body = _flag(m, "body", True)
    if attributes and not body:
        raise m.loc.at("otlp_attributes").error(m.node("otlp_attributes"), "selects body values: not with body: false")
    query = _flag(m, "query", False)
    headers = tuple(h.lower() for h in m.texts("headers", ()))
    cookies = m.texts("cookies", ())
    action = _choice(m.text("action", "mask"), ("mask", "log"), m.loc.at("action"), m.where("action"))
    m.finish()
    directions = frozenset(("request", "response") if direction == "both" else (direction,))
    return MaskRule(
        name, directions, tuple(paths), tuple(chosen), operator, keep, on_invalid, body, headers, cookies, query, action,  # type: ignore[arg-type]
    )


_ATTRIBUTE_GLOB = re.compile(r"[A-Za-z0-9_.:/@*?-]+")


def otlp_attribute_path(glob: str, loc: _Loc, node: Node) -> str:
    """The RFC 9535 JSONPath of a mask rule's `otlp_attributes` item: the string and
    bytes values (arrays and kvlists included; bytes are read as UTF-8 text) of every OTLP attribute, of spans, events, links,
    resources, scopes and log records, whose key matches `glob` (`*`: any characters,
    `?`: one), in the OTLP/JSON shape (`hoop_addon.masking.otlp`). A key without
    wildcards is compared exactly; a glob becomes an I-Regexp (RFC 9485) for `match()`.
    Keys hold letters, digits and `_ . : / @ -` (OpenTelemetry attribute names), else a
    `PolicyError`."""
    if not _ATTRIBUTE_GLOB.fullmatch(glob):
        raise loc.error(node, f"attribute key glob {glob!r}: use letters, digits, '_ . : / @ -' and the wildcards * and ?")
    if "*" not in glob and "?" not in glob:
        return f"$..attributes[?@.key=='{glob}'].value..['stringValue','bytesValue']"
    pattern = glob.replace(".", "[.]").replace("*", ".*").replace("?", ".")
    return f"$..attributes[?match(@.key, '{pattern}')].value..['stringValue','bytesValue']"


def _flag(m: _Map, key: str, default: bool) -> bool:
    if not m.has(key):
        m.read.add(key)
        return default
    return _scalar(m.node(key), m.loc.at(key), bool)


def _names(m: _Map, key: str, issuers: dict[str, str]) -> Names:
    """The list at `key` (absent: empty) as `Names`: `<issuer name>:<name>` is of that
    issuer (`issuers`: name -> URL); a bare name is of any issuer, refused when several
    issuers are trusted, since each of them can mint it."""
    anywhere, scoped = set(), set()
    for value, loc, node in m.listed(key):
        prefix, sep, name = value.partition(":")
        if sep and name and prefix in issuers:
            scoped.add((issuers[prefix], name))
        elif len(issuers) > 1:
            choices = " or ".join(f"'{i}:{value}'" for i in sorted(issuers))
            raise loc.error(node, f"'{value}' could come from any of the {len(issuers)} trusted issuers: write {choices}")
        else:
            anywhere.add(value)
    return Names(frozenset(anywhere), frozenset(scoped))


def _route(
    m: _Map, names: dict[str, str], rules: dict[str, MaskRule], resolve_env: bool, issuers: dict[str, str],
    mcp_names: dict[str, str],
) -> Route:
    name = _name(m, names, "route")
    match = m.sub("match")
    hosts = tuple(h.lower() for h in match.texts("hosts"))
    paths = tuple(p for p, _, _ in match.listed("paths")) or ("*",)
    for p, loc, node in match.listed("paths"):
        if not p.startswith(("/", "*")):
            raise loc.error(node, "a path glob starts with '/' or '*'")
    methods = frozenset(x.upper() for x in match.texts("methods", ()))
    match.finish()
    allow = m.sub("allow")
    groups, subjects = _names(allow, "groups", issuers), _names(allow, "subjects", issuers)
    client_ids, scopes = _names(allow, "client_ids", issuers), _names(allow, "scopes", issuers)
    allow.finish()
    if not (groups or subjects or client_ids or scopes):
        raise allow.loc.error(allow.mapping, "admits nobody: name allow.groups or allow.subjects (or client_ids, scopes)")
    masking = []
    for rule, loc, node in m.listed("masking"):
        if rule not in rules:
            raise loc.error(node, f"unknown masking rule '{rule}'")
        masking.append(rules[rule])
    credential = _credential(m.sub("credential"), resolve_env) if m.has("credential") else None
    retention = _duration(m, "retention") if m.has("retention") else None
    api = m.text("api") if m.has("api") else None
    if api is not None and api not in APIS:
        raise m.loc.at("api").error(m.node("api"), f"unknown api '{api}': one of {', '.join(APIS)}")
    mcp = _mcp(m.sub("mcp"), name, issuers, mcp_names) if m.has("mcp") else None
    if mcp is not None:
        masking = [_per_message(rule) for rule in masking]
    m.finish()
    return Route(name, hosts, paths, methods, groups, subjects, tuple(masking), credential, client_ids, scopes, retention, api, mcp)


def _per_message(rule: MaskRule) -> MaskRule:
    """`rule` for an MCP route, whose bodies may be JSON-RPC batches (a JSON array of
    messages): each of its JSONPaths also applies to every message of a batch (`$.a`
    gains `$[*].a`), so a rule written for one message (`$.params.arguments.*`) masks
    the same members in a batch instead of missing them. A rule without paths reads
    the whole body already."""
    if not rule.paths:
        return rule
    extra = [(f"$[*]{text.strip()[1:]}", jsonpath_rfc9535.compile(f"$[*]{text.strip()[1:]}")) for text, _ in rule.paths]
    return replace(rule, paths=(*rule.paths, *extra))


MCP_ACTIONS = ("allow", "deny", "approve")
MCP_TARGETS = ("tools", "prompts", "resources")


def _mcp(m: _Map, route: str, issuers: dict[str, str], names: dict[str, str]) -> McpPolicy:
    """A route's `mcp:` block: `default` (allow | deny; default deny), `pinning`
    (alert | hide; default alert), `pin_approvers` (`groups`, `subjects`; required with
    hide), `resource` (the route's resource URI, RFC 8707) and `rules`, each with `name`, at least one of `tools` / `prompts` / `resources` (globs of tool
    names, prompt names, resource URIs) / `server_methods` (globs of the methods of the
    server's requests and notifications to the client; such a rule is allow or deny and
    has no `arguments`), an optional `when` (`issuers`: issuer names;
    `groups`; `subjects`; `arguments`: a list of `{path: JSONPath, matches: RE2}` on
    the call's `params.arguments`), `action` (allow | deny | approve), `reason`, and for
    `approve` only: `approvers` (`groups`, `subjects`), `timeout` (seconds, 1..86400),
    `min_approvals` (1..10)."""
    default = _choice(m.text("default", "deny"), ("allow", "deny"), m.loc.at("default"), m.where("default"))
    tool_rules = []
    if m.has("rules"):
        rloc = m.loc.at("rules")
        tool_rules = [_tool_rule(_Map(node, rloc.at(i)), route, issuers, names) for i, node in _seq(m.node("rules"), rloc)]
    pinning = _choice(m.text("pinning", "alert"), ("alert", "hide"), m.loc.at("pinning"), m.where("pinning"))
    groups = subjects = Names()
    if m.has("pin_approvers"):
        approvers = m.sub("pin_approvers")
        groups, subjects = _names(approvers, "groups", issuers), _names(approvers, "subjects", issuers)
        approvers.finish()
    if pinning == "hide" and not (groups or subjects):
        raise m.loc.error(m.mapping, "pinning: hide hides a changed tool until someone accepts it: name pin_approvers.groups or .subjects")
    resource = m.text("resource") if m.has("resource") else None
    if resource is not None:
        parts = urlsplit(resource)
        if parts.scheme not in ("https", "http") or not parts.hostname or "#" in resource:
            raise m.loc.at("resource").error(m.node("resource"), "must be an absolute http(s) URI without a fragment (RFC 8707 §2)")
        if not key_url_allowed(resource):
            raise m.loc.at("resource").error(m.node("resource"), "must be https (plain http only on loopback)")
    m.finish(("default", "rules", "pinning", "pin_approvers", "resource"))
    return McpPolicy(tuple(tool_rules), default, pinning, groups, subjects, resource)  # type: ignore[arg-type]


def _tool_rule(m: _Map, route: str, issuers: dict[str, str], names: dict[str, str]) -> ToolRule:
    name = _name(m, names, "MCP rule")
    globs = {key: m.texts(key, ()) for key in (*MCP_TARGETS, "server_methods")}
    if not any(globs.values()):
        raise m.loc.error(m.mapping, "an MCP rule names what it governs: tools, prompts, resources or server_methods (globs)")
    action = _choice(m.text("action"), MCP_ACTIONS, m.loc.at("action"), m.node("action"))
    if globs["server_methods"] and action == "approve":
        # nobody holds a server's request: the client waits on its own call meanwhile
        raise m.loc.at("action").error(m.node("action"), "a rule with server_methods is allow or deny: a server's request cannot be held for approval")
    when: dict[str, Any] = {}
    if m.has("when"):
        w = m.sub("when")
        known = [(v, loc, n) for v, loc, n in w.listed("issuers")]
        for value, loc, node in known:
            if value not in issuers:
                raise loc.error(node, f"unknown issuer '{value}': one of {', '.join(sorted(issuers))}")
        arguments = _json_conditions(w, "arguments")
        if arguments and globs["server_methods"]:
            raise w.loc.at("arguments").error(w.node("arguments"), "arguments are a call's: a rule with server_methods cannot have them")
        when = {"issuers": frozenset(issuers[v] for v, _, _ in known), "groups": _names(w, "groups", issuers),
                "subjects": _names(w, "subjects", issuers), "arguments": tuple(arguments)}
        w.finish(("issuers", "groups", "subjects", "arguments"))
    reason = m.text("reason", {"allow": "allowed", "deny": "denied", "approve": "needs approval"}[action] + f" by rule {name}")
    approval = None
    if action == "approve":
        approvers = m.sub("approvers")
        groups, subjects = _names(approvers, "groups", issuers), _names(approvers, "subjects", issuers)
        approvers.finish()
        if not groups and not subjects:
            raise approvers.loc.error(approvers.mapping, "nobody can approve: name approvers.groups or approvers.subjects")
        approval = ApprovalRule(
            name=name, when=Conditions(routes=frozenset({route})), approver_groups=groups, approver_subjects=subjects,
            reason=reason, min_approvals=_bounded(m, "min_approvals", 1, 1, 10), timeout=_bounded(m, "timeout", 300, 1, 86_400),
        )
    else:
        for key in ("approvers", "timeout", "min_approvals"):
            if m.has(key):
                raise m.loc.at(key).error(m.items[key][0], f"only an 'approve' rule has {key} (this one is '{action}')")
    m.finish(("name", *MCP_TARGETS, "server_methods", "when", "action", "reason", "approvers", "timeout", "min_approvals"))
    return ToolRule(name, action, reason, globs["tools"], globs["prompts"], globs["resources"], globs["server_methods"],  # type: ignore[arg-type]
                    approval=approval, **when)


CREDENTIAL_KINDS = ("header", "bearer", "basic", "query", "aws_sigv4")
_AWS_NAME = re.compile(r"[a-z0-9-]{1,64}")


def _credential(m: _Map, resolve_env: bool) -> Credential:
    """One of: `header: NAME` + `value: SECRET`; `bearer: SECRET`;
    `basic: {username: TEXT, password: SECRET}`; `query: NAME` + `value: SECRET`;
    `aws_sigv4: {access_key_id: SECRET, secret_access_key: SECRET, session_token?: SECRET,
    region: NAME, service: NAME}` (the gateway signs each request). SECRET holds `${ENV_VAR}` / `${file:PATH}` references, never the secret itself."""
    kinds = [k for k in CREDENTIAL_KINDS if m.has(k)]
    if len(kinds) != 1:
        raise m.loc.error(m.mapping, f"name exactly one of: {', '.join(CREDENTIAL_KINDS)}")
    kind = kinds[0]
    resolved: list[str] = []  # the secrets' values, which a response must never carry back
    if kind == "bearer":
        credential = Credential("Authorization", "Bearer " + _secret(m, "bearer", resolve_env, resolved))
    elif kind == "basic":
        basic = m.sub("basic")
        username, password = basic.text("username"), _secret(basic, "password", resolve_env, resolved)
        if ":" in username:
            raise basic.loc.at("username").error(basic.node("username"), "must not contain ':' (RFC 7617)")
        basic.finish()
        pair = f"{username}:{password}"
        credential = Credential("Authorization", "Basic " + (base64.b64encode(pair.encode()).decode() if resolve_env else pair))
        if resolve_env:
            resolved.append(credential.value.removeprefix("Basic "))
    elif kind == "query":
        credential = Credential("Authorization", _secret(m, "value", resolve_env, resolved), param=m.text("query"))
    elif kind == "aws_sigv4":
        aws = m.sub("aws_sigv4")
        key_id, secret = _secret(aws, "access_key_id", resolve_env, resolved), _secret(aws, "secret_access_key", resolve_env, resolved)
        token = _secret(aws, "session_token", resolve_env, resolved) if aws.has("session_token") else None
        names = {}
        for key in ("region", "service"):
            names[key] = aws.text(key)
            if not _AWS_NAME.fullmatch(names[key]):
                raise aws.loc.at(key).error(aws.node(key), "use lower-case letters, digits and '-' (e.g. us-east-1, s3)")
        aws.finish()
        credential = Credential("Authorization", "", aws=AwsSigV4(key_id, secret, names["region"], names["service"], token))
    else:
        credential = Credential(m.text("header"), _secret(m, "value", resolve_env, resolved))
    m.finish()
    return replace(credential, secrets=tuple(resolved))


def _secret(m: _Map, key: str, resolve: bool, resolved: list[str] | None = None) -> str:
    """The text at `key` with its secret references resolved (left as written when not
    `resolve`); each resolved value is appended to `resolved`. Errors name the variable
    or file, never a secret's value."""
    template, node, loc = m.text(key), m.node(key), m.loc.at(key)
    if not _SECRET_REF.search(template):
        raise loc.error(node, "write secrets as ${ENV_VAR} references, never literally (or as ${file:PATH})")

    def value(ref: re.Match[str]) -> str:
        if ref[1]:
            found, where = os.environ.get(ref[1], ""), f"environment variable {ref[1]}"
            if not found:
                raise loc.error(node, f"{where} is not set")
        else:
            path = m.loc.dir / ref[2]
            where = f"secret file {path}"
            try:
                with open(path, "rb") as fh:
                    raw = fh.read(MAX_SECRET_FILE_BYTES + 1)
                found = raw.decode().strip() if len(raw) <= MAX_SECRET_FILE_BYTES else ""
            except OSError as exc:
                raise loc.error(node, f"cannot read {where}: {exc.strerror}") from None
            except UnicodeDecodeError:
                found = ""
        # Control characters (CR/LF) in a header or URL would let a secret inject requests.
        if not found or any(ord(c) < 0x20 or c == "\x7f" for c in found):
            raise loc.error(node, f"{where} must hold one line of text (at most {MAX_SECRET_FILE_BYTES} bytes)")
        if resolved is not None:
            resolved.append(found)
        return found

    return _SECRET_REF.sub(value, template) if resolve else template


def _jsonpath(text: str, loc: _Loc, node: Node) -> jsonpath_rfc9535.JSONPathQuery:
    """Compile an RFC 9535 JSONPath query, or a `PolicyError`."""
    try:
        return jsonpath_rfc9535.compile(text)
    except jsonpath_rfc9535.JSONPathError as exc:
        raise loc.error(node, f"invalid JSONPath: {str(exc).splitlines()[0]}") from None


def _re2(text: str, loc: _Loc, node: Node) -> Any:
    """Compile a user-written RE2 pattern (linear time: no ReDoS), or a `PolicyError`."""
    try:
        return re2.compile(text)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise loc.error(node, f"invalid RE2 pattern: {reason}") from None


def _bounded(m: _Map, key: str, default: int, low: int, high: int) -> int:
    value = m.integer(key, default)
    if not low <= value <= high:
        raise m.loc.at(key).error(m.where(key), f"must be {low}..{high}")
    return value


def _conditions(m: _Map, route_names: set[str], issuers: dict[str, str]) -> Conditions:
    """The `when` of a block or approval rule; at least one condition is required."""
    for name, loc, node in m.listed("routes"):
        if name not in route_names:
            hint = difflib.get_close_matches(name, route_names, n=1)
            raise loc.error(node, f"unknown route '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    headers = []
    if m.has("headers"):
        hmap = m.sub("headers")
        for header, (_, value_node) in hmap.items.items():
            hmap.read.add(header)
            pattern = _scalar(value_node, hmap.loc.at(header), str)
            headers.append((header.lower(), _re2(pattern, hmap.loc.at(header), value_node)))
    json = _json_conditions(m, "json")
    when = Conditions(
        routes=frozenset(name for name, _, _ in m.listed("routes")),
        methods=frozenset(x.upper() for x in m.texts("methods", ())),
        groups=_names(m, "groups", issuers),
        subjects=_names(m, "subjects", issuers),
        headers=tuple(headers),
        body_over=_bounded(m, "body_larger_than", -1, 0, 1 << 40) if m.has("body_larger_than") else None,
        tokens_over=_bounded(m, "tokens_more_than", -1, 0, 1 << 40) if m.has("tokens_more_than") else None,
        body=tuple(_re2(text, loc, node) for text, loc, node in m.listed("body_matches")),
        json=tuple(json),
    )
    m.finish()
    if when == Conditions():
        raise m.loc.error(m.mapping, "a rule needs at least one condition (it would match every request)")
    return when


def _block_rule(m: _Map, names: dict[str, str], route_names: set[str], issuers: dict[str, str]) -> BlockRule:
    name = _name(m, names, "block/approval rule")
    rule = BlockRule(
        name=name,
        when=_conditions(m.sub("when"), route_names, issuers),
        action=_choice(m.text("action", "block"), ("block", "log"), m.loc.at("action"), m.where("action")),  # type: ignore[arg-type]
        reason=m.text("reason", f"blocked by rule {name}"),
    )
    m.finish()
    return rule


def _approval_rule(m: _Map, names: dict[str, str], route_names: set[str], issuers: dict[str, str]) -> ApprovalRule:
    name = _name(m, names, "block/approval rule")
    when = _conditions(m.sub("when"), route_names, issuers)
    approvers = m.sub("approvers")
    groups, subjects = _names(approvers, "groups", issuers), _names(approvers, "subjects", issuers)
    approvers.finish()
    if not groups and not subjects:
        raise approvers.loc.error(approvers.mapping, "nobody can approve: name approvers.groups or approvers.subjects")
    rule = ApprovalRule(
        name=name,
        when=when,
        approver_groups=groups,
        approver_subjects=subjects,
        reason=m.text("reason", f"needs approval under rule {name}"),
        min_approvals=_bounded(m, "min_approvals", 1, 1, 10),
        timeout=_bounded(m, "timeout", 300, 1, 86_400),
        mode=_choice(m.text("mode", "hold"), ("hold", "ticket"), m.loc.at("mode"), m.where("mode")),  # type: ignore[arg-type]
        ticket_window=_bounded(m, "ticket_window", 900, 1, 86_400),
        action=_choice(m.text("action", "require"), ("require", "log"), m.loc.at("action"), m.where("action")),  # type: ignore[arg-type]
    )
    m.finish()
    return rule


LIMIT_KEYS = ("subject", "group", "route", "client_id")
LIMIT_AMOUNTS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")


def _limit(m: _Map, names: dict[str, str], route_names: set[str], issuers: dict[str, str]) -> Limit:
    """One `limits:` item: `name`, `per` (subject | group | route | client_id; a list,
    default subject; [] for one count shared by all), `when` (`routes`, `groups`,
    `subjects`; optional), at least one of `requests_per_minute`, `tokens_per_minute`,
    `tokens_per_day` (1..10^12), `action` (enforce | log), `default_output_tokens` (the
    output reserved for a request that declares no bound; below every token amount)."""
    name = _name(m, names, "limit")
    per = tuple(_choice(v, LIMIT_KEYS, loc, n) for v, loc, n in m.listed("per")) if m.has("per") else ("subject",)
    if len(set(per)) != len(per):
        raise m.loc.at("per").error(m.node("per"), "names a key twice")
    when = m.sub("when") if m.has("when") else None
    routes: frozenset[str] = frozenset()
    groups = subjects = Names()
    if when is not None:
        for route, loc, node in when.listed("routes"):
            if route not in route_names:
                raise loc.error(node, f"unknown route '{route}'")
        routes = frozenset(r for r, _, _ in when.listed("routes"))
        groups, subjects = _names(when, "groups", issuers), _names(when, "subjects", issuers)
        when.finish()
    amounts = {key: _bounded(m, key, 0, 1, 10**12) for key in LIMIT_AMOUNTS if m.has(key)}
    action = _choice(m.text("action", "enforce"), ("enforce", "log"), m.loc.at("action"), m.where("action"))
    reserve = _bounded(m, "default_output_tokens", DEFAULT_OUTPUT_TOKENS, 1, 10**12)
    m.finish(("name", "per", "when", "action", "default_output_tokens", *LIMIT_AMOUNTS))  # a misspelt amount is named before it is missed
    if not amounts:
        raise m.loc.error(m.mapping, f"a limit needs at least one of: {', '.join(LIMIT_AMOUNTS)}")
    for kind in ("tokens_per_minute", "tokens_per_day"):
        if kind in amounts and reserve >= amounts[kind]:
            where = "default_output_tokens" if m.has("default_output_tokens") else kind
            raise m.loc.at(where).error(
                m.where(where), f"default_output_tokens ({reserve}) must be below {kind} ({amounts[kind]}): a request "
                "that declares no max_tokens reserves that many output tokens; set default_output_tokens lower")
    return Limit(name, per, routes, groups, subjects, action=action, default_output_tokens=reserve, **amounts)  # type: ignore[arg-type]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(m: _Map, key: str) -> int:
    """Seconds from an integer or `<n>s|m|h|d` (e.g. `90d`); must be positive."""
    node, loc = m.node(key), m.loc.at(key)
    text = _scalar(node, loc, str)
    found = re.fullmatch(r"([0-9]+)([smhd]?)", text)
    if not found or int(found[1]) == 0:
        raise loc.error(node, "expected a positive duration such as 3600, 90s, 30m, 12h or 90d")
    return int(found[1]) * _UNITS[found[2] or "s"]


def _recording(rec: _Map | None, audit: _Map | None) -> RecordingPolicy:
    """The `recording:` and `audit:` sections (both optional)."""
    settings: dict[str, Any] = {}
    if rec is not None:
        settings["signing"] = _choice(rec.text("signing", "required"), ("required", "unsigned"), rec.loc.at("signing"), rec.where("signing"))
        if rec.has("checkpoint"):
            cp = rec.sub("checkpoint")
            settings["checkpoint_flows"] = _bounded(cp, "flows", 100, 1, 1_000_000)
            settings["checkpoint_seconds"] = _bounded(cp, "seconds", 1, 1, 86_400)
            cp.finish()
        if rec.has("rotate"):
            rot = rec.sub("rotate")
            settings["rotate_bytes"] = _bounded(rot, "bytes", 0, 0, 1 << 40)
            settings["rotate_seconds"] = _bounded(rot, "seconds", 0, 0, 366 * 86_400)
            rot.finish()
        if rec.has("scrub"):
            scrub = rec.sub("scrub")
            settings["scrub_cookies"] = scrub.texts("cookies", ())
            settings["scrub_query"] = scrub.texts("query", ())
            scrub.finish()
        if rec.has("retention"):
            settings["retention"] = _duration(rec, "retention")
        rec.finish(("signing", "checkpoint", "rotate", "scrub", "retention"))
    if audit is not None:
        if audit.has("checkpoint"):
            cp = audit.sub("checkpoint")
            settings["audit_checkpoint_entries"] = _bounded(cp, "entries", 100, 1, 1_000_000)
            settings["audit_checkpoint_seconds"] = _bounded(cp, "seconds", 30, 1, 86_400)
            cp.finish()
        audit.finish(("checkpoint",))
    return RecordingPolicy(**settings)


def _json_conditions(m: _Map, key: str) -> list[tuple[str, Any, Any]]:
    """The `key` list of a rule's conditions: items `{path: JSONPath, matches: RE2}`, as
    (JSONPath source, compiled RFC 9535 query, compiled RE2 pattern) triples."""
    found = []
    if m.has(key):
        loc = m.loc.at(key)
        for i, node in _seq(m.node(key), loc):
            item = _Map(node, loc.at(i))
            path = item.text("path")
            query = _jsonpath(path, item.loc.at("path"), item.node("path"))
            found.append((path, query, _re2(item.text("matches"), item.loc.at("matches"), item.node("matches"))))
            item.finish()
    return found

"""Kubernetes' syntax for the strings a fleet's spec hands on: names,
labels, Secret keys, resource quantities and container image references.

A spec string that ends up in a child object (a Service or pod name, a
label, a Secret reference, a resource request), in a command-line flag or in
an environment variable must be refused by the CRD when Kubernetes, the
kubelet or the worker would refuse it later: a fleet the API server accepts
and the operator then cannot build is stuck with no useful error.

Each pattern is read by two engines: RE2 (the API server's OpenAPI
`pattern` and CEL `matches`) and Python's `re` (FleetSpec.parse, through
schema_check.py). They agree only on a common subset, so every pattern here
is anchored at both ends (matched whole with `re.fullmatch`, as RE2's `$`
does not match before a final newline the way Python's does), uses explicit
ASCII classes (never `\\s`, `\\w` or `\\d`, which Python reads as Unicode)
and no lookaround (RE2 has none). tests/operator/test_crds.py checks that.

`PATTERN_NAMES` says in words what each pattern admits, for error messages.
"""

from __future__ import annotations

import re

from elasticfleet.worker.adapters.names import ADAPTER_VERSION, NAME

# DNS-1123 label: Kubernetes object names such as Namespaces, and here task
# and adapter names; at most 63 characters (the schema's maxLength).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# DNS-1123 subdomain: most object names (Secrets, custom resources); at most
# 253 characters.
_LABEL_PART = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = rf"{_LABEL_PART}(\.{_LABEL_PART})*"
DNS_SUBDOMAIN = rf"^{_SUBDOMAIN}$"
# DNS-1035 label: Service names, which must start with a letter.
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

# A label value (also a nodeSelector value): empty, or alphanumerics with
# '-', '_' and '.' inside; at most 63 characters.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
MAX_LABEL_VALUE = 63
# A label key (a qualified name): an optional DNS subdomain prefix and '/',
# then a name of at most 63 characters. The prefix's bound of 253 characters
# is a separate check (LABEL_KEY_PREFIX): RE2 cannot count across groups.
LABEL_KEY = rf"^({_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
LABEL_KEY_PREFIX = r"^[^/]{1,253}/[^/]*$"
MAX_LABEL_KEY_PREFIX = 253

# A key of a Secret or ConfigMap (validation.IsConfigMapKey): alphanumerics,
# '-', '_' and '.', never '.' or '..' or starting with '..'.
CONFIG_MAP_KEY = r"^\.?[-_A-Za-z0-9][-._A-Za-z0-9]*$"

# resource.Quantity (k8s.io/apimachinery/pkg/api/resource/quantity.go):
#   <quantity>        ::= <sign>? <number> <suffix>?
#   <number>          ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
#   <suffix>          ::= <binarySI> | <decimalSI> | <decimalExponent>
#   <binarySI>        ::= Ki | Mi | Gi | Ti | Pi | Ei
#   <decimalSI>       ::= n | u | m | k | M | G | T | P | E
#   <decimalExponent> ::= (e | E) <sign>? <digits>
# The documented grammar allows a decimal exponent (e1.5); the parser refuses
# it, and an exponent that does not fit an int64, so this takes an integer
# of at most 18 digits. The parser also reads a suffix with no digits ("Gi",
# ".") as zero, which the grammar excludes and so does this.
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]{1,18})?$"

# A container image reference as the kubelet parses it
# (github.com/distribution/reference, ParseNormalizedNamed): an optional
# registry host (DNS name, IPv4 or [IPv6]; a bracketed one is a host only
# with a ':' in it, as the kubelet splits names) and port, lowercase path
# components joined by '/', an optional tag and an optional digest. Digests
# are restricted to the algorithms the kubelet can verify, with their exact
# lowercase hex lengths (go-digest). Two rules RE2 cannot state are separate:
# a bare 64-hex string is an image ID, not a reference (IMAGE_ID), and the
# repository name, "docker.io/library/" included when the reference has no
# registry, is at most 255 characters (MAX_IMAGE bounds the whole string so).
_PATH_COMPONENT = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"({_DOMAIN_COMPONENT}(\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9]*:[a-fA-F0-9:]*\])"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"(sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})"
IMAGE = rf"^({_HOST}(:[0-9]+)?/)?{_PATH_COMPONENT}(/{_PATH_COMPONENT})*(:{_TAG})?(@{_DIGEST})?$"
IMAGE_ID = r"^[a-f0-9]{64}$"
MAX_IMAGE = 255 - len("docker.io/library/")

# A Redis URL that redis-py reads without error and without surprises:
# redis:// or rediss://, an optional user (never a password: that belongs in
# a Secret), a host name or IPv4 address, a port 1-65535 (0 would silently
# mean 6379), an optional database number, and no query (unknown options
# fail only when the worker connects).
_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
REDIS_URL = (
    rf"^rediss?://([-._~A-Za-z0-9]+@)?[A-Za-z0-9]([-.A-Za-z0-9]*[A-Za-z0-9])?(:{_PORT})?"
    r"(/[0-9]{0,9})?$"
)
# The store's key prefix, handed to workers in an environment variable they
# strip: printable ASCII without spaces, so both read the same prefix.
KEY_PREFIX = r"^[!-~]+$"
# A path passed as a flag's value: not starting with '-' (the flag parser
# would read it as a flag) and without control characters (a NUL cannot
# cross exec at all).
FLAG_PATH = r"^([^-\x00-\x1f\x7f][^\x00-\x1f\x7f]*)?$"

PATTERN_NAMES = {
    DNS_LABEL: "a DNS-1123 label (lowercase letters, digits and '-', starting and ending "
    "with a letter or digit)",
    DNS_SUBDOMAIN: "a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')",
    DNS_1035_LABEL: "a DNS-1035 label (lowercase letters, digits and '-', starting with a "
    "letter and ending with a letter or digit)",
    LABEL_VALUE: "a label value (letters, digits, '-', '_' and '.', starting and ending with "
    "a letter or digit)",
    CONFIG_MAP_KEY: "a Secret key (letters, digits, '-', '_' and '.', not starting with '..')",
    QUANTITY: "a Kubernetes quantity such as 500m, 2, 1.5 or 16Gi",
    IMAGE: "an image reference such as registry.example.com/team/elasticfleet-worker:0.1.0 "
    "(lowercase repository, optional :tag and @sha256:digest)",
    REDIS_URL: "a redis:// or rediss:// URL such as redis://redis.elasticfleet.svc:6379/0 "
    "(no password, no query)",
    KEY_PREFIX: "printable ASCII without spaces",
    FLAG_PATH: "a path not starting with '-' and without control characters",
    NAME: "1-63 lowercase letters, digits, '-' or '_', starting and ending with a letter or "
    "digit (an adapter or task name in the store)",
    ADAPTER_VERSION: "a positive integer",
}


def matches(pattern: str, value: str) -> bool:
    """Whether `value` matches `pattern` (one of the above) as RE2 reads it:
    the whole string, so that no trailing newline slips past `$`."""
    return re.fullmatch(pattern, value) is not None

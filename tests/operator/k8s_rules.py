"""What Kubernetes and the kubelet accept, ported from their Go sources as
test oracles, independent of the patterns the CRDs use (operator/syntax.py):

- names and labels: k8s.io/apimachinery/pkg/util/validation (IsDNS1123Label,
  IsDNS1123Subdomain, IsDNS1035Label, IsQualifiedName, IsValidLabelValue,
  IsConfigMapKey);
- quantities: k8s.io/apimachinery/pkg/api/resource (parseQuantityString and
  the suffixer's interpret, as ParseQuantity runs them, after UnmarshalJSON's
  TrimSpace);
- image references: github.com/distribution/reference (ParseNormalizedNamed:
  the 64-hex check, splitDockerDomain, the lowercase check, Parse with its
  length limit) and go-digest's Validate for the algorithms the kubelet has.

Each function answers whether the value is accepted; the checks stop at
the first refusal, as the Go code's callers do.
"""

from __future__ import annotations

import re

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
DNS1035_LABEL_MAX = 63
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = 63

_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = _LABEL + r"(\." + _LABEL + ")*"
_DNS1035 = "[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_CONFIG_MAP_KEY = "[-._a-zA-Z0-9]+"


def _whole(pattern: str, value: str) -> bool:
    # Go's MatchString on "^...$": `$` is the end of the text only.
    return re.fullmatch(pattern, value, re.ASCII) is not None


def is_dns1123_label(value: str) -> bool:
    return len(value) <= DNS1123_LABEL_MAX and _whole(_LABEL, value)


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= DNS1123_SUBDOMAIN_MAX and _whole(_SUBDOMAIN, value)


def is_dns1035_label(value: str) -> bool:
    return len(value) <= DNS1035_LABEL_MAX and _whole(_DNS1035, value)


def is_qualified_name(value: str) -> bool:
    """A label or annotation key."""
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix or not is_dns1123_subdomain(prefix):
            return False
    else:
        return False
    return 0 < len(name) <= QUALIFIED_NAME_MAX and _whole(_QUALIFIED, name)


def is_label_value(value: str) -> bool:
    return len(value) <= LABEL_VALUE_MAX and (value == "" or _whole(_QUALIFIED, value))


def is_config_map_key(value: str) -> bool:
    """A key of a Secret or ConfigMap, as a secretKeyRef's key."""
    if len(value) > DNS1123_SUBDOMAIN_MAX or not _whole(_CONFIG_MAP_KEY, value):
        return False
    return value not in (".", "..") and not value.startswith("..")


# -- resource.Quantity ------------------------------------------------------

_DECIMAL_SUFFIXES = {"n", "u", "m", "", "k", "M", "G", "T", "P", "E"}
_BINARY_SUFFIXES = {"Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
_SUFFIX_CHARACTERS = "eEinumkKMGTP"
_DIGITS = "0123456789"
# Go's unicode.IsSpace, which strings.TrimSpace strips.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    chr(c) for c in range(0x2000, 0x200B)
)


def _scan(text: str) -> tuple[bool, bool, str] | None:
    """parseQuantityString: (negative, whether the number has a digit,
    suffix), or None for ErrFormatWrong."""
    position, end = 0, len(text)
    negative = False
    if position < end and text[0] in "+-":
        negative = text[0] == "-"
        position += 1
    start = position
    while position < end and text[position] in _DIGITS:
        position += 1
    digits = position > start
    if position < end and text[position] == ".":
        position += 1
        start = position
        while position < end and text[position] in _DIGITS:
            position += 1
        digits = digits or position > start
    suffix_start = position
    while position < end and text[position] in _SUFFIX_CHARACTERS:
        position += 1
    if position < end and text[position] in "+-":
        position += 1
    while position < end and text[position] in _DIGITS:
        position += 1
    if position < end:
        return None
    return negative, digits, text[suffix_start:]


def _suffix_ok(suffix: str) -> bool:
    """The suffixer's interpret: an SI suffix, or e/E and an int64."""
    if suffix in _DECIMAL_SUFFIXES or suffix in _BINARY_SUFFIXES:
        return True
    if len(suffix) > 1 and suffix[0] in "eE":
        exponent = suffix[1:]
        unsigned = exponent[1:] if exponent[0] in "+-" else exponent
        if unsigned == "" or any(c not in _DIGITS for c in unsigned):
            return False
        return -(2**63) <= int(exponent) < 2**63
    return False


def parses_as_quantity(text: str) -> bool:
    """Whether the API server reads `text` (a JSON string) as a Quantity.
    A number without digits ("Gi", ".", "-") is refused here: the documented
    grammar excludes it, while the Go parser reads some of them as zero and
    refuses others (those its slow path takes: "Pi", "e-10"), a quirk no
    one should rely on."""
    scanned = _scan(text.strip(_GO_SPACE))
    return scanned is not None and scanned[1] and _suffix_ok(scanned[2])


def is_resource_quantity(text: str) -> bool:
    """Whether a container's request or limit may be `text`: a quantity
    that is not negative (ValidateNonnegativeQuantity); a negative zero is
    zero."""
    if not parses_as_quantity(text):
        return False
    stripped = text.strip(_GO_SPACE)
    mantissa = re.split("[eE]", stripped)[0]
    return not stripped.startswith("-") or not any(c in "123456789" for c in mantissa)


# -- image references ---------------------------------------------------------

_ALPHANUMERIC = "[a-z0-9]+"
_SEPARATOR = "(?:[._]|__|[-]+)"
_DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + ")*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_AND_PORT = "(?:" + _DOMAIN_NAME + "|" + _IPV6 + ")" + "(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
_PATH_COMPONENT = _ALPHANUMERIC + "(?:" + _SEPARATOR + _ALPHANUMERIC + ")*"
_REMOTE_NAME = _PATH_COMPONENT + "(?:/" + _PATH_COMPONENT + ")*"
_NAME = "(?:" + _DOMAIN_AND_PORT + "/)?" + _REMOTE_NAME
_REFERENCE = "(" + _NAME + ")(?::(" + _TAG + "))?(?:@(" + _DIGEST + "))?"
_IDENTIFIER = "[a-f0-9]{64}"
NAME_TOTAL_LENGTH_MAX = 255
# The digest algorithms a kubelet can verify (go-digest registers those
# whose hash is linked in), with their hex lengths.
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}


def _split_docker_domain(name: str) -> tuple[str, str]:
    head, slash, rest = name.partition("/")
    if not slash or (
        not any(c in head for c in ".:") and head != "localhost" and head.lower() == head
    ):
        domain, remainder = "docker.io", name
    else:
        domain, remainder = head, rest
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in remainder:
        remainder = "library/" + remainder
    return domain, remainder


def _digest_ok(digest: str) -> bool:
    algorithm, _, encoded = digest.partition(":")
    length = _DIGEST_HEX.get(algorithm)
    return length is not None and _whole(f"[a-f0-9]{{{length}}}", encoded)


def is_image_reference(image: str) -> bool:
    """Whether the kubelet can pull `image` (else the pod is InvalidImageName)."""
    if _whole(_IDENTIFIER, image):
        return False
    domain, remainder = _split_docker_domain(image)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        return False
    match = re.fullmatch(_REFERENCE, f"{domain}/{remainder}", re.ASCII)
    if match is None or len(match.group(1)) > NAME_TOTAL_LENGTH_MAX:
        return False
    return match.group(3) is None or _digest_ok(match.group(3))

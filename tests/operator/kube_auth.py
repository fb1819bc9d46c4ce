"""Who is asking, and may they: bearer-token authentication and RBAC for
the emulated API server (kube_emulator.py), after kube-apiserver's.

The operator runs in a cluster under a ServiceAccount bound to exactly the
rules the Helm chart grants; a request outside them is refused with 403 and
the operator breaks there, not in the tests, unless the tests refuse it too.
So the emulator authenticates every request and authorizes it the way a real
API server does, from the Roles, ClusterRoles and bindings applied to it:

- identities: the admin (group system:masters, which RBAC never checks, as
  kubeadm's admin.conf) and ServiceAccounts, whose tokens the TokenRequest
  API issues (as a kubelet gets the token it mounts into a pod):
  `system:serviceaccount:<ns>:<name>` in the groups system:serviceaccounts,
  system:serviceaccounts:<ns> and system:authenticated;
- request attributes as kube-apiserver's RequestInfoFactory derives them from
  the method and path: GET of an object is get, of a collection list, with
  ?watch=true watch; POST create, PUT update, PATCH patch, DELETE delete (of a
  collection deletecollection); a subresource is resource/subresource;
- RBAC's evaluation: a ClusterRoleBinding grants its ClusterRole everywhere,
  a RoleBinding its Role or ClusterRole in the binding's namespace only;
  rules match verbs, API groups, resources (`*`, `*/subresource`) and
  resourceNames; non-resource URLs by path (`/apis/*`);
- the bootstrap grant every cluster has: discovery, /version and the health
  paths to every authenticated user (system:discovery,
  system:public-info-viewer);
- refusals with the real API's Status: 401 Unauthorized, and 403 Forbidden
  whose message names the user, verb, resource, group and namespace.

It serves HTTPS only: client-go (kubectl) sends no credentials over plain
HTTP, so the identity of the tests' own kubectl would be lost. The
certificate is self-signed for 127.0.0.1, made once per test process; a
kubeconfig carries it as the cluster's certificate authority.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kmock
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ADMINS = "system:masters"
AUTHENTICATED = "system:authenticated"
RBAC = "rbac.authorization.k8s.io/v1"

# The bootstrap ClusterRoles system:discovery and system:public-info-viewer,
# bound to system:authenticated in every cluster.
_DISCOVERY_RULES = [
    {
        "verbs": ["get"],
        "nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*",
            "/version", "/version/", "/healthz", "/livez", "/readyz",
        ],
    }
]  # fmt: skip


@dataclass(frozen=True)
class User:
    """An authenticated identity."""

    name: str
    groups: tuple[str, ...]


ADMIN = User("kubernetes-admin", (ADMINS, AUTHENTICATED))


def service_account(namespace: str, name: str) -> User:
    """The identity a ServiceAccount's token carries."""
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED)
    return User(f"system:serviceaccount:{namespace}:{name}", groups)


@dataclass(frozen=True)
class Attributes:
    """What a request asks to do; `resource` is empty for a non-resource
    URL (discovery, /version)."""

    verb: str
    path: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @classmethod
    def of(cls, method: str, path: str, query: Mapping[str, str]) -> Attributes:
        """Attributes as kube-apiserver derives them (RequestInfoFactory)."""
        parts = [part for part in path.split("/") if part]
        if len(parts) >= 3 and parts[0] == "apis":
            group, rest = parts[1], parts[3:]
        elif len(parts) >= 2 and parts[0] == "api":
            group, rest = "", parts[2:]
        else:
            rest = []
        if not rest:
            return cls(verb=method.lower(), path=path)
        namespace = ""
        if rest[0] == "namespaces" and len(rest) > 1:
            namespace = rest[1]
            # /namespaces/NAME and its own subresources are the Namespace itself.
            if len(rest) > 2 and rest[2] not in ("status", "finalize"):
                rest = rest[2:]
        resource, name, subresource = (*rest, "", "")[:3]
        if method == "GET":
            verb = "watch" if query.get("watch") in ("true", "1") else "get" if name else "list"
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
        return cls(verb, path, group, resource, subresource, namespace, name)

    @property
    def full_resource(self) -> str:
        """resource or resource/subresource, as RBAC rules name it."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


@dataclass(frozen=True)
class Decision:
    """One authorization the emulator made, kept so tests can count them."""

    user: User
    attributes: Attributes
    allowed: bool


Objects = Callable[[str], Iterable[Mapping[str, Any]]]


class Authorizer:
    """RBAC over the Roles, ClusterRoles and bindings the cluster holds;
    `objects(resource)` lists the stored objects of e.g.
    'rbac.authorization.k8s.io/v1/clusterroles'."""

    def __init__(self, objects: Objects) -> None:
        self.objects = objects

    def allows(self, user: User, request: Attributes) -> bool:
        if ADMINS in user.groups:
            return True
        if AUTHENTICATED in user.groups and _grants(_DISCOVERY_RULES, request):
            return True
        return any(_grants(rules, request) for rules in self._rules_of(user, request.namespace))

    def _rules_of(self, user: User, namespace: str) -> Iterable[list[dict[str, Any]]]:
        """The rules of every role bound to `user` that apply in `namespace`
        (cluster-wide ones only when `namespace` is empty)."""
        cluster_roles = {r["metadata"]["name"]: r for r in self.objects(f"{RBAC}/clusterroles")}
        for binding in self.objects(f"{RBAC}/clusterrolebindings"):
            if _binds(binding, user):
                yield cluster_roles.get(binding["roleRef"]["name"], {}).get("rules") or []
        if not namespace:
            return
        roles = {
            r["metadata"]["name"]: r
            for r in self.objects(f"{RBAC}/roles")
            if r["metadata"].get("namespace") == namespace
        }
        for binding in self.objects(f"{RBAC}/rolebindings"):
            if binding["metadata"].get("namespace") != namespace or not _binds(binding, user):
                continue
            ref = binding["roleRef"]
            found = (cluster_roles if ref["kind"] == "ClusterRole" else roles).get(ref["name"], {})
            yield found.get("rules") or []


def _binds(binding: Mapping[str, Any], user: User) -> bool:
    for subject in binding.get("subjects") or []:
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "ServiceAccount":
            if user.name == f"system:serviceaccount:{subject.get('namespace')}:{name}":
                return True
        elif (kind == "User" and user.name == name) or (kind == "Group" and name in user.groups):
            return True
    return False


def _grants(rules: Iterable[Mapping[str, Any]], request: Attributes) -> bool:
    return any(_rule_grants(rule, request) for rule in rules)


def _rule_grants(rule: Mapping[str, Any], request: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if request.verb not in verbs and "*" not in verbs:
        return False
    if not request.resource:
        return any(
            fnmatch.fnmatchcase(request.path, url) for url in rule.get("nonResourceURLs", [])
        )
    groups = rule.get("apiGroups") or []
    resources = rule.get("resources") or []
    names = rule.get("resourceNames") or []
    return (
        (request.group in groups or "*" in groups)
        and (
            request.full_resource in resources
            or "*" in resources
            or (bool(request.subresource) and f"*/{request.subresource}" in resources)
        )
        and (not names or request.name in names)
    )


def forbidden(user: User, request: Attributes) -> kmock.KubernetesError:
    """403 as kube-apiserver words it (responsewriters.forbiddenMessage)."""
    if not request.resource:
        message = f'forbidden: User "{user.name}" cannot {request.verb} path "{request.path}"'
        return kmock.KubernetesError(status=403, reason="Forbidden", message=message, details={})
    scope = (
        f'in the namespace "{request.namespace}"' if request.namespace else "at the cluster scope"
    )
    why = (
        f'User "{user.name}" cannot {request.verb} resource "{request.full_resource}" '
        f'in API group "{request.group}" {scope}'
    )
    qualified = f"{request.resource}.{request.group}" if request.group else request.resource
    what = f'{qualified} "{request.name}"' if request.name else qualified
    details = {"group": request.group, "kind": request.resource}
    if request.name:
        details["name"] = request.name
    return kmock.KubernetesError(
        status=403, reason="Forbidden", message=f"{what} is forbidden: {why}", details=details
    )


def unauthorized() -> kmock.KubernetesError:
    return kmock.KubernetesError(
        status=401, reason="Unauthorized", message="Unauthorized", details={}
    )


@cache
def _certificate() -> tuple[bytes, bytes]:
    """(certificate, key) in PEM: self-signed, for IP 127.0.0.1, a day long."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-emulator")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_authority() -> bytes:
    """The PEM a client trusts the emulator by."""
    return _certificate()[0]


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain reads only files: they live as long as this call.
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(_certificate()[0])
        key.write_bytes(_certificate()[1])
        context.load_cert_chain(cert, key)
    return context


def client_context() -> ssl.SSLContext:
    return ssl.create_default_context(cadata=certificate_authority().decode())

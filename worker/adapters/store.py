"""The Redis adapter store: versioned AsymLoRA adapter sets, published atomically.

Workers fetch adapters from Redis part by part (see `adapter_format`), so the
store keeps every part in its own blob and describes each version with a JSON
manifest that lists every part's size and sha256. Key layout, under a prefix
(default ``elasticfleet:``):

    {prefix}adapters                        SET of adapter names
    {prefix}adapter:{name}:next             version counter (INCR; never reset)
    {prefix}adapter:{name}:versions         ZSET of published versions (score = version)
    {prefix}adapter:{name}:current          the current version number
    {prefix}adapter:{name}:manifest:{v}     version v's manifest (JSON)
    {prefix}adapter:{name}:blob:{v}:{part}  one part's safetensors bytes, e.g. ...:blob:3:B/code/7

Why publishing is atomic: a version's blobs are written first under keys that
no reader can reach (no manifest names them yet) and never change afterwards;
then one Lua script checks that every blob is there and, in one step, writes
the manifest, adds the version to the index and moves the current pointer. A
reader resolves the current version to a manifest and reads that version's
blobs, so it sees the old version or the new one, never a mix. Version numbers
are never reused (the counter survives deleting the whole adapter), so an
(adapter, version) pair always names the same bytes, which is what lets
workers cache parts by it.

Deleting: an old version can be deleted at any time; workers that pinned it
keep what they cached, and fetch NOT_FOUND for the rest. Deleting the *current*
version is refused (`StoreConflict`): readers resolving "current" would find
nothing, and silently rolling back to an older version is a decision for a
person, who can publish again or delete the whole adapter.

Garbage: a push interrupted before its commit (a killed client, a Redis that
stalled or went away) leaves blobs that no manifest names, and so does a
whole-adapter delete interrupted after its index step. `collect_garbage`
(`elasticfleet adapters gc`) sweeps them; see its docstring for why it never
races a push in progress.

Everything read back is parsed defensively (`adapter_format`): manifests are
bounded in size, must match their spec and their key, and one bad manifest is
reported alone by `list_adapters` instead of hiding the others.

The store moves parts as bytes and never decodes them, so it imports no
torch (the operator checks AdapterSets through it, and its image has none):
it publishes any `Publishable` (`AdapterWeights` encodes its parts), and
`weights.read_tensors` and `weights.fetch` turn what it reads into tensors.

Timeouts: a command waits at most `connect_timeout_s` to connect and
`timeout_s` for each reply, and a timeout is not retried (a Redis that
stalled once is likely stalled still, and the caller decides when to try
again); only refused or reset connections are retried, briefly. So a store
call on a stalled Redis fails as StoreUnavailable within about
connect_timeout_s + timeout_s + 1 s (19 s by default), not minutes.

The store needs a single Redis primary (or Sentinel-managed replication); the
publish script touches the index and the adapter's keys together, so Redis
Cluster is not supported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from elasticfleet.worker.adapters.format import (
    MAX_MANIFEST_BYTES,
    AdapterFormatError,
    AdapterSpec,
    check_name,
    parse_json,
    shown,
)

DEFAULT_PREFIX = "elasticfleet:"
MANIFEST_FORMAT = 1

# A version is at most a few hundred blobs of up to a few MB each; reading
# them in pipelines of this many keeps round trips low without buffering a
# whole large adapter in one reply.
PIPELINE_CHUNK = 64
# Redis' own limit on one string value.
MAX_BLOB_BYTES = 512 << 20
# How long a blob no manifest names must have been left untouched before
# `collect_garbage` removes it: far longer than any push takes.
GC_GRACE_S = 3600.0

_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(rb"[1-9][0-9]{0,17}")  # what INCR hands out; bounded for int()


def _environment(name: str) -> str:
    """A variable without surrounding whitespace: from a Secret made from a
    file it ends in a newline (the operator strips Secrets the same way)."""
    return os.environ.get(name, "").strip()


class AdapterStoreError(Exception):
    """Base class of every error the store raises."""


class AdapterNotFound(AdapterStoreError, LookupError):
    """The adapter, version, task or part does not exist (gRPC NOT_FOUND)."""


class StoreUnavailable(AdapterStoreError, ConnectionError):
    """Redis cannot be reached or timed out (gRPC UNAVAILABLE); retrying later may work."""

    retryable = True


class StoreAuthError(AdapterStoreError, PermissionError):
    """Redis refused the credentials, or its TLS certificate failed verification
    (gRPC UNAUTHENTICATED); retrying will not help."""


class DigestMismatch(AdapterStoreError, ValueError):
    """Stored data is unusable (gRPC DATA_LOSS): a blob's bytes do not match
    its manifest, a manifest is unreadable or contradicts its key, or a blob
    is not the safetensors part its manifest says. It was not used."""


class StoreConflict(AdapterStoreError, RuntimeError):
    """The operation conflicts with the store's state (gRPC FAILED_PRECONDITION),
    e.g. deleting the current version, or an adapter deleted while publishing."""


@dataclass(frozen=True)
class PartInfo:
    """What the manifest records about one blob."""

    size: int
    sha256: str


@dataclass(frozen=True)
class AdapterManifest:
    """One published version of an adapter set."""

    spec: AdapterSpec
    version: int
    created: str
    parts: Mapping[str, PartInfo]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def total_bytes(self) -> int:
        """Bytes of all blobs (safetensors-encoded parts) of this version."""
        return sum(info.size for info in self.parts.values())

    def to_json(self) -> str:
        raw: dict[str, Any] = {"format": MANIFEST_FORMAT, **self.spec.to_dict()}
        raw["version"] = self.version
        raw["created"] = self.created
        raw["total_bytes"] = self.total_bytes
        raw["parts"] = {p: {"size": i.size, "sha256": i.sha256} for p, i in self.parts.items()}
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "adapter manifest") -> AdapterManifest:
        """Parse a manifest defensively: bounded in size before parsing, the
        spec's declared sizes bounded before the parts are sized by them,
        and the parts exactly the spec's, each with a plausible size and a
        sha256. `DigestMismatch` (data loss) naming `where` if unusable."""
        try:
            raw = parse_json(text, max_bytes=MAX_MANIFEST_BYTES, what="it")
            if raw.get("format") != MANIFEST_FORMAT:
                raise AdapterFormatError(f"unsupported manifest format {shown(raw.get('format'))}")
            spec = AdapterSpec.from_dict(raw)
            version, created = raw.get("version"), raw.get("created")
            if type(version) is not int or version < 1:
                raise AdapterFormatError(f"version {shown(version)} is not a positive integer")
            if not isinstance(created, str) or len(created) > 64:
                raise AdapterFormatError(f"created {shown(created)} is not a timestamp")
            return cls(spec, version, created, _parts(spec, raw.get("parts")))
        except AdapterFormatError as error:
            raise DigestMismatch(f"{where} is unreadable: {error}") from None


def _parts(spec: AdapterSpec, raw: object) -> dict[str, PartInfo]:
    """A manifest's parts: exactly those of a complete set of `spec`."""
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"its parts are a {type(raw).__name__}, not an object")
    expected = spec.part_names()
    if len(raw) != len(expected) or not set(raw) <= set(expected):
        odd = sorted(set(raw) ^ set(expected), key=str)[:3]
        raise AdapterFormatError(
            f"its {len(raw):,} parts are not the {len(expected)} of its spec, e.g. "
            f"{', '.join(shown(part) for part in odd)}"
        )
    parts: dict[str, PartInfo] = {}
    for part, info in raw.items():
        size = info.get("size") if isinstance(info, dict) else None
        digest = info.get("sha256") if isinstance(info, dict) else None
        if type(size) is not int or not 0 <= size <= MAX_BLOB_BYTES:
            raise AdapterFormatError(f"part {part} has no valid size: {shown(info)}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise AdapterFormatError(f"part {part} has no valid sha256: {shown(info)}")
        parts[part] = PartInfo(size, digest)
    return parts


@dataclass(frozen=True)
class AdapterSummary:
    """One adapter as `AdapterStore.list_adapters` reports it; `problems`
    says (a sentence each) what of it could not be read."""

    name: str
    current: int | None
    versions: list[AdapterManifest]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class GarbageReport:
    """What `AdapterStore.collect_garbage` found: blobs no manifest names,
    by (adapter, version), the memory Redis says they hold (MEMORY USAGE),
    and whether it removed them."""

    blobs: int
    bytes: int
    versions: list[tuple[str, int]]
    young: int  # such blobs still inside the grace period, kept
    deleted: bool


# Commit a publish: KEYS = index set, manifest, current, versions, blob keys...;
# ARGV = adapter name, manifest JSON, version. Returns the current version.
_COMMIT = """
for i = 5, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    return redis.error_reply('MISSING ' .. KEYS[i])
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.error_reply('EXISTS ' .. KEYS[2])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
local current = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[3]) > current then
  redis.call('SET', KEYS[3], ARGV[3])
  return tonumber(ARGV[3])
end
return current
"""

# Delete one version: KEYS = current, versions, manifest, blob keys...; ARGV = version.
_DELETE_VERSION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.error_reply('CURRENT')
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return redis.error_reply('UNKNOWN')
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', unpack(KEYS, 3))
return 1
"""

# Remove unreferenced blobs of one version unless it has a manifest (re-checked
# here, atomically with the delete): KEYS = manifest, blob keys...
_SWEEP = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
return redis.call('UNLINK', unpack(KEYS, 2))
"""

# Delete an adapter's index entries: KEYS = index set, current, versions;
# ARGV = name, manifest key prefix. Returns the versions it removed.
_DELETE_ADAPTER = """
local versions = redis.call('ZRANGE', KEYS[3], 0, -1)
for _, v in ipairs(versions) do
  redis.call('DEL', ARGV[2] .. v)
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[1], ARGV[1])
return versions
"""


def redact_url(url: str) -> str:
    """`url` with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern (the prefix may hold glob characters)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `kind` is in `error`'s chain (redis-py wraps socket errors)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class Publishable(Protocol):
    """A complete adapter set as the store keeps it: its spec and each
    part's bytes (`weights.AdapterWeights` is one, encoding its tensors)."""

    @property
    def spec(self) -> AdapterSpec: ...

    def encoded_parts(self) -> dict[str, bytes]: ...


class AdapterStore:
    """Adapter sets in Redis: publish, list, read and delete versions.

    Thread-safe: redis-py's client keeps a connection pool. Every Redis failure
    surfaces as one of this module's exceptions, with the URL (password
    redacted) in the message.
    """

    def __init__(
        self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX, where: str = "Redis"
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.where = where
        # Client-side counters, so tests and metrics can see what was read.
        self.blobs_read = 0
        self.bytes_read = 0

    @classmethod
    def from_environment(
        cls,
        url: str | None = None,
        *,
        password: str | None = None,
        prefix: str | None = None,
        default_url: str | None = None,
        **options: Any,
    ) -> AdapterStore | None:
        """The store that flags, else $ELASTICFLEET_REDIS_URL / _PASSWORD /
        _PREFIX, describe (a worker pod, the operator and a shell share one
        configuration); None when neither gives a URL and there is no
        `default_url`. `options` go to from_url (TLS settings)."""
        url = url or _environment("ELASTICFLEET_REDIS_URL") or default_url
        if not url:
            return None
        return cls.from_url(
            url,
            password=password or _environment("ELASTICFLEET_REDIS_PASSWORD") or None,
            prefix=prefix or _environment("ELASTICFLEET_REDIS_PREFIX") or DEFAULT_PREFIX,
            **options,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        password: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_verify: bool = True,
        connect_timeout_s: float = 3.0,
        timeout_s: float = 15.0,
        retries: int = 2,
    ) -> AdapterStore:
        """A store on `url` (redis:// or rediss:// for TLS; user and password
        may be in the URL, `password` overrides it).

        The timeouts bound how long a worker waits before an uncached fetch
        fails as UNAVAILABLE; 15 s of socket timeout leaves room for multi-MB
        blobs on a slow link. Only refused or reset connections are retried,
        few times and briefly (at most ~1 s): a timeout is final, so a call
        fails within connect_timeout_s + timeout_s + ~1 s (the module
        docstring says why). redis-py retries a connection's handshake and
        then the command with the same policy, so retrying timeouts would
        multiply the wait ((retries + 1)^2 timeouts: over two minutes).
        """
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss"):
            # Never the URL itself: it may carry a password.
            found = f"starts with {scheme}://" if "://" in url else "has no scheme"
            raise ValueError(
                f"a Redis URL must start with redis:// or rediss:// (this one {found})"
            )
        options: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "socket_timeout": timeout_s,
            "retry": Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=0.5),
                retries,
                supported_errors=(redis.exceptions.ConnectionError,),
            ),
            "health_check_interval": 30,
            "client_name": "elasticfleet",
        }
        if password is not None:
            options["password"] = password
        if scheme == "rediss":
            options["ssl_ca_certs"] = tls_ca
            options["ssl_certfile"] = tls_cert
            options["ssl_keyfile"] = tls_key
            if not tls_verify:
                options["ssl_cert_reqs"] = "none"
                options["ssl_check_hostname"] = False
        elif tls_ca or tls_cert or tls_key or not tls_verify:
            raise ValueError(f"TLS options need a rediss:// URL, got {redact_url(url)}")
        client = redis.Redis.from_url(url, **options)
        return cls(client, prefix=prefix, where=f"Redis at {redact_url(url)}")

    def close(self) -> None:
        self.client.close()

    # -- keys -----------------------------------------------------------------

    def _key(self, name: str, suffix: str) -> str:
        return f"{self.prefix}adapter:{name}:{suffix}"

    def _index_key(self) -> str:
        return f"{self.prefix}adapters"

    def _blob_key(self, name: str, version: int, part: str) -> str:
        return self._key(name, f"blob:{version}:{part}")

    def _manifest_key(self, name: str, version: int) -> str:
        return self._key(name, f"manifest:{version}")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate redis-py's exceptions into this module's, saying what failed."""
        try:
            yield
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as error:
            raise StoreAuthError(
                f"{self.where} refused the credentials while {action}: {error}; "
                "check the password (--password or ELASTICFLEET_REDIS_PASSWORD)"
            ) from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            if _caused_by(error, ssl.SSLCertVerificationError):
                raise StoreAuthError(
                    f"{self.where}: the server's TLS certificate failed verification while "
                    f"{action} ({error}); pass the CA that signed it (--tls-ca)"
                ) from None
            raise StoreUnavailable(
                f"{self.where} is unreachable while {action} ({error}); "
                "retry when Redis is reachable again"
            ) from None
        except redis.exceptions.NoPermissionError as error:
            raise StoreAuthError(f"{self.where} denied {action}: {error}") from None
        except redis.exceptions.RedisError as error:
            raise AdapterStoreError(f"{self.where} failed while {action}: {error}") from None

    # -- publishing -----------------------------------------------------------

    def publish(self, weights: Publishable) -> AdapterManifest:
        """Publish a complete adapter set as its next version and make it current."""
        blobs = weights.encoded_parts()
        name = weights.spec.name
        with self._errors(f"publishing adapter {name!r}"):
            version = int(self.client.incr(self._key(name, "next")))
            manifest = AdapterManifest(
                spec=weights.spec,
                version=version,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                parts={p: PartInfo(len(b), sha256_hex(b)) for p, b in blobs.items()},
            )
            keys = {part: self._blob_key(name, version, part) for part in blobs}
            items = list(blobs.items())
            try:
                for start in range(0, len(items), PIPELINE_CHUNK):
                    pipe = self.client.pipeline(transaction=False)
                    for part, blob in items[start : start + PIPELINE_CHUNK]:
                        pipe.set(keys[part], blob)
                    pipe.execute()
            except redis.exceptions.RedisError as error:
                # Cleaning up after a Redis that stalled or went away would
                # wait out another timeout: `collect_garbage` sweeps those.
                if not isinstance(error, _UNREACHABLE):
                    self._discard(keys.values())
                raise
            try:
                self.client.eval(
                    _COMMIT,
                    4 + len(keys),
                    self._index_key(),
                    self._manifest_key(name, version),
                    self._key(name, "current"),
                    self._key(name, "versions"),
                    *keys.values(),
                    name,
                    manifest.to_json(),
                    str(version),
                )
            except redis.exceptions.ResponseError as error:
                # Nothing was committed, so the blobs are unreachable. (Not so
                # after a connection error: the commit may have happened.)
                if str(error).startswith("MISSING"):
                    self._discard(keys.values())
                if str(error).startswith(("MISSING", "EXISTS")):
                    raise StoreConflict(
                        f"publishing adapter {name!r} version {version} failed: {error} "
                        "(was the adapter deleted meanwhile?); publish again"
                    ) from None
                raise
        return manifest

    def _discard(self, keys: Iterable[str]) -> None:
        """Best effort: remove the blobs of a publish that did not commit."""
        with contextlib.suppress(redis.exceptions.RedisError):
            self.client.unlink(*keys)

    # -- reading --------------------------------------------------------------

    def current_version(self, name: str) -> int:
        """The current version of adapter `name`."""
        check_name("adapter", name)
        with self._errors(f"resolving adapter {name!r}"):
            raw = cast(bytes | None, self.client.get(self._key(name, "current")))
        if raw is None:
            raise AdapterNotFound(f"adapter {name!r} is not in {self.where}")
        return _version_number(raw, f"adapter {name!r}'s current version")

    def manifest(self, name: str, version: int | None = None) -> AdapterManifest:
        """Version `version` of adapter `name` (the current one if None)."""
        check_name("adapter", name)
        if version is None:
            version = self.current_version(name)
        with self._errors(f"reading adapter {name!r} version {version}"):
            raw = cast(bytes | None, self.client.get(self._manifest_key(name, version)))
        if raw is None:
            known = self.version_numbers(name)
            listing = ", ".join(map(str, known)) if known else "none (the adapter does not exist)"
            raise AdapterNotFound(
                f"adapter {name!r} has no version {version} in {self.where}; versions: {listing}"
            )
        return _manifest(raw, name, version)

    def version_numbers(self, name: str) -> list[int]:
        """Adapter `name`'s published versions, ascending (empty if unknown;
        members that are not version numbers are not versions, and skipped)."""
        with self._errors(f"listing versions of adapter {name!r}"):
            members = cast(list[bytes], self.client.zrange(self._key(name, "versions"), 0, -1))
        return sorted(int(m) for m in members if _VERSION.fullmatch(m))

    def versions(self, name: str) -> list[AdapterManifest]:
        """Every published version's manifest, ascending; DigestMismatch if one is unreadable."""
        manifests, problems = self._read_versions(name)
        if problems:
            raise DigestMismatch(problems[0])
        return manifests

    def _read_versions(self, name: str) -> tuple[list[AdapterManifest], list[str]]:
        """The readable manifests of adapter `name`'s versions, and why the others are not."""
        numbers = self.version_numbers(name)
        if not numbers:
            return [], []
        with self._errors(f"reading manifests of adapter {name!r}"):
            raws = cast(
                list[bytes | None],
                self.client.mget([self._manifest_key(name, v) for v in numbers]),
            )
        manifests, problems = [], []
        # A version deleted between the two reads is simply not listed.
        for version, raw in zip(numbers, raws, strict=True):
            if raw is not None:
                try:
                    manifests.append(_manifest(raw, name, version))
                except DigestMismatch as error:
                    problems.append(str(error))
        return manifests, problems

    def list_adapters(self) -> list[AdapterSummary]:
        """Every adapter with its current version and versions (with sizes).
        What cannot be read (an invalid name in the index, a corrupt current
        pointer, an unreadable manifest) is reported in its adapter's
        `problems`, so one bad entry does not hide the others."""
        with self._errors("listing adapters"):
            members = cast(set[bytes], self.client.smembers(self._index_key()))
        summaries = []
        for name in sorted(m.decode(errors="replace") for m in members):
            try:
                check_name("adapter", name)
            except AdapterFormatError as error:
                summaries.append(AdapterSummary(name, None, [], (f"the adapter index: {error}",)))
                continue
            with self._errors(f"resolving adapter {name!r}"):
                raw = cast(bytes | None, self.client.get(self._key(name, "current")))
            problems = []
            current = None
            try:
                if raw is not None:
                    current = _version_number(raw, f"adapter {name!r}'s current version")
            except DigestMismatch as error:
                problems.append(str(error))
            manifests, unreadable = self._read_versions(name)
            summaries.append(AdapterSummary(name, current, manifests, (*problems, *unreadable)))
        return summaries

    def read_parts(self, manifest: AdapterManifest, parts: Iterable[str]) -> dict[str, bytes]:
        """The verified blobs of `parts` of `manifest`'s version.

        Every blob is checked against the manifest's size and sha256 before
        any is returned, so a caller never sees, let alone caches, a bad one.
        """
        wanted = list(dict.fromkeys(parts))
        unknown = [p for p in wanted if p not in manifest.parts]
        if unknown:
            raise AdapterNotFound(
                f"adapter {manifest.name!r} version {manifest.version} has no part(s) "
                f"{', '.join(unknown[:5])}"
            )
        blobs: dict[str, bytes] = {}
        where = f"reading adapter {manifest.name!r} version {manifest.version}"
        for start in range(0, len(wanted), PIPELINE_CHUNK):
            chunk = wanted[start : start + PIPELINE_CHUNK]
            with self._errors(where):
                pipe = self.client.pipeline(transaction=False)
                for part in chunk:
                    pipe.get(self._blob_key(manifest.name, manifest.version, part))
                values = pipe.execute()
            for part, blob in zip(chunk, values, strict=True):
                if blob is None:
                    raise AdapterNotFound(
                        f"adapter {manifest.name!r} version {manifest.version} part {part} is "
                        f"missing from {self.where} (the version was deleted)"
                    )
                self._verify(manifest, part, blob)
                blobs[part] = blob
        self.blobs_read += len(blobs)
        self.bytes_read += sum(len(b) for b in blobs.values())
        return blobs

    @staticmethod
    def _verify(manifest: AdapterManifest, part: str, blob: bytes) -> None:
        info = manifest.parts[part]
        digest = sha256_hex(blob)
        if len(blob) != info.size or digest != info.sha256:
            raise DigestMismatch(
                f"adapter {manifest.name!r} version {manifest.version} part {part} is corrupt: "
                f"sha256 {digest[:16]}... ({len(blob)} bytes), manifest says "
                f"{info.sha256[:16]}... ({info.size} bytes); it was not used. "
                "Publish the adapter again."
            )

    # -- deleting -------------------------------------------------------------

    def delete_version(self, name: str, version: int) -> AdapterManifest:
        """Delete one non-current version; returns its manifest."""
        manifest = self.manifest(name, version)
        keys = [self._blob_key(name, version, p) for p in manifest.parts]
        with self._errors(f"deleting adapter {name!r} version {version}"):
            try:
                self.client.eval(
                    _DELETE_VERSION,
                    3 + len(keys),
                    self._key(name, "current"),
                    self._key(name, "versions"),
                    self._manifest_key(name, version),
                    *keys,
                    str(version),
                )
            except redis.exceptions.ResponseError as error:
                if str(error).startswith("CURRENT"):
                    raise StoreConflict(
                        f"version {version} is adapter {name!r}'s current version; publish a "
                        "newer one first, or delete the whole adapter"
                    ) from None
                if str(error).startswith("UNKNOWN"):
                    raise AdapterNotFound(
                        f"adapter {name!r} version {version} was already deleted"
                    ) from None
                raise
        return manifest

    def delete_adapter(self, name: str) -> list[int]:
        """Delete an adapter and all its versions; returns the versions deleted.

        The index entries go in one atomic step (readers then find no adapter);
        the blobs, unreachable from then on, are removed after it. The version
        counter stays so that numbers are never reused.
        """
        check_name("adapter", name)
        with self._errors(f"deleting adapter {name!r}"):
            removed = cast(
                list[bytes],
                self.client.eval(
                    _DELETE_ADAPTER,
                    3,
                    self._index_key(),
                    self._key(name, "current"),
                    self._key(name, "versions"),
                    name,
                    self._key(name, "manifest:"),
                ),
            )
            if not removed:
                raise AdapterNotFound(f"adapter {name!r} is not in {self.where}")
            pattern = _glob_escape(self._key(name, "blob:")) + "*"
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    self.client.unlink(*batch)
                    batch = []
            if batch:
                self.client.unlink(*batch)
        return sorted(int(v) for v in removed)

    # -- garbage ----------------------------------------------------------------

    def collect_garbage(
        self, *, grace_s: float = GC_GRACE_S, delete: bool = False
    ) -> GarbageReport:
        """Find, and with `delete` remove, the blobs no manifest names (left
        by interrupted pushes and deletes), once idle for `grace_s`.

        Why it never races a push: a push writes its blobs before its
        manifest, so a blob without a manifest may be one of a push still
        running. Only blobs that nothing has written or read for `grace_s`
        (Redis' OBJECT IDLETIME; an hour by default, far longer than a push)
        are taken, and each version's blobs go in one Lua step that first
        re-checks the version still has no manifest. A push slower than the
        grace period loses nothing it published either: its commit checks
        that every blob exists, so it fails ("publish again") rather than
        publishing a version with holes. Readers are never affected: they
        only read blobs their manifest names.

        Needs OBJECT IDLETIME, which Redis does not track under an LFU
        maxmemory-policy (the store wants noeviction anyway).
        """
        prefix = f"{self.prefix}adapter"
        blob = re.compile(re.escape(prefix.encode()) + rb":([a-z0-9_-]{1,63}):blob:(\d{1,18}):")
        found: dict[tuple[str, int], list[bytes]] = {}
        with self._errors("looking for unreferenced blobs"):
            for key in self.client.scan_iter(match=_glob_escape(prefix) + ":*:blob:*", count=500):
                match = blob.match(key)
                if match is not None:
                    found.setdefault((match[1].decode(), int(match[2])), []).append(key)
            versions = list(found)
            referenced = self._pipelined(
                lambda pipe, v: pipe.exists(self._manifest_key(*v)), versions
            )
            orphans = [v for v, exists in zip(versions, referenced, strict=True) if not exists]
            keys = [key for v in orphans for key in found[v]]
            # Neither command touches a key (STRLEN would reset its idle time).
            idle = self._pipelined(lambda pipe, key: pipe.object("idletime", key), keys)
            sizes = self._pipelined(lambda pipe, key: pipe.memory_usage(key), keys)
            old = {key for key, seconds in zip(keys, idle, strict=True) if seconds >= grace_s}
            swept = [v for v in orphans if old.intersection(found[v])]
            if delete:
                for version in swept:
                    stale = [key for key in found[version] if key in old]
                    for start in range(0, len(stale), 500):
                        self.client.eval(
                            _SWEEP,
                            1 + len(stale[start : start + 500]),
                            self._manifest_key(*version),
                            *stale[start : start + 500],
                        )
        return GarbageReport(
            blobs=len(old),
            bytes=sum(size for key, size in zip(keys, sizes, strict=True) if key in old),
            versions=sorted(swept),
            young=len(keys) - len(old),
            deleted=delete,
        )

    def _pipelined(self, command: Any, items: Sequence[Any]) -> list[Any]:
        """command(pipe, item) for every item, in pipelines of PIPELINE_CHUNK."""
        results: list[Any] = []
        for start in range(0, len(items), PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for item in items[start : start + PIPELINE_CHUNK]:
                command(pipe, item)
            results += pipe.execute()
        return results


_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _version_number(raw: bytes, what: str) -> int:
    """A version number read from Redis; DigestMismatch if it is not one."""
    if not _VERSION.fullmatch(raw):
        raise DigestMismatch(f"{what} is not a version number: {shown(raw)}")
    return int(raw)


def _manifest(raw: bytes, name: str, version: int) -> AdapterManifest:
    """The manifest stored under adapter `name`'s version `version`, which
    must describe that version of that adapter: a reader would otherwise
    fetch another adapter's blobs."""
    where = f"adapter {name!r} version {version}'s manifest"
    manifest = AdapterManifest.from_json(raw, where)
    if (manifest.name, manifest.version) != (name, version):
        raise DigestMismatch(
            f"{where} describes adapter {manifest.name!r} version {manifest.version}; it was not "
            "used. Publish the adapter again."
        )
    return manifest

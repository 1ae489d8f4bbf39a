# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kmod_archive fleet lock: a lease object in the store.

Acquire: create the lease only if absent (S3 ``If-None-Match: *``, file ``link()``); the
lease holds its owner and an expiry time. A lease whose expiry has passed is taken over with a
compare-and-swap on its ETag (S3 ``If-Match``), so two hosts cannot both take over the same
stale lease. The same owner acquiring again takes its lease back at once (re-entrant: a machine
that rebooted mid-compile need not wait out its own lease) with a new token. Each acquisition
draws a random ``token``: a renewal (``renew``) and a release change the lease only while it
still holds the caller's owner and token and is unchanged since it was read (``If-Match``), so
a run never renews nor frees a lease another run holds, the same machine's included. While
waiting, the caller's ``done`` callback (for kmod_archive: "does the archive exist now?") ends
the wait early."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from typing import Any, Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils.stores import Store, StoreError

MAX_ATTEMPTS = 100000  # a bound on the loop, far above any real wait (each pass sleeps or makes progress)


class LeaseResult:
    def __init__(self, acquired: bool, holder: Optional[dict[str, Any]], waited: float,
                 took_over: bool = False, renewed: bool = False, done: bool = False,
                 token: Optional[str] = None, expires: Optional[float] = None) -> None:
        self.acquired = acquired
        self.token = token
        self.expires = expires
        self.holder = holder
        self.waited = waited
        self.took_over = took_over
        self.renewed = renewed
        self.done = done

    def as_dict(self) -> dict[str, Any]:
        return {"acquired": self.acquired, "holder": self.holder, "waited": round(self.waited, 3),
                "took_over": self.took_over, "renewed": self.renewed, "token": self.token,
                "expires": int(self.expires) if self.expires is not None else None}


def new_token() -> str:
    return secrets.token_hex(8)


def lease_body(owner: str, ttl: float, now: float, token: str = "", acquired: Optional[float] = None) -> bytes:
    """The lease's bytes: who holds it (``owner``, ``token``), since when, until when."""
    body = {"owner": owner, "token": token, "host": socket.gethostname(), "pid": os.getpid(),
            "acquired": int(now if acquired is None else acquired), "renewed": int(now), "expires": int(now + ttl)}
    return json.dumps(body, sort_keys=True).encode()


def parse_lease(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {"owner": None, "expires": 0, "corrupt": True}
    if not isinstance(body, dict):
        return {"owner": None, "expires": 0, "corrupt": True}
    return body


def acquire(store: Store, key: str, owner: str, ttl: float, wait: float, poll: float = 5.0,
            done: Optional[Callable[[], bool]] = None, clock: Callable[[], float] = time.time,
            sleep: Callable[[float], None] = time.sleep) -> LeaseResult:
    """Try to hold the lease ``key`` for ``ttl`` seconds, waiting at most ``wait`` seconds.

    Returns acquired=False with the current holder when the wait ran out, or done=True when
    ``done()`` became true while waiting (the holder finished: nothing left to do)."""
    if not store.supports_lock:
        raise StoreError(f"store {store.url} cannot hold a lock (read-only)")
    start = clock()
    holder: Optional[dict[str, Any]] = None
    token = new_token()

    def won(result: LeaseResult) -> LeaseResult:
        """The holder we waited for may have pushed and released just before we took the lease: then
        there is nothing to do, and the lease goes back at once."""
        if done is not None and done():
            release(store, key, owner, token)
            return LeaseResult(False, result.holder, clock() - start, done=True)
        return result

    for _attempt in range(MAX_ATTEMPTS):
        now = clock()
        if store.create_exclusive(key, lease_body(owner, ttl, now, token)):
            return won(LeaseResult(True, holder, now - start, token=token, expires=now + ttl))
        current = store.read_small(key)
        if current is None:
            continue  # released between our create and our read: try again at once
        data, etag = current
        holder = parse_lease(data)
        if holder.get("owner") == owner:
            if store.replace_if_match(key, lease_body(owner, ttl, now, token), etag):
                return won(LeaseResult(True, holder, now - start, renewed=True, token=token, expires=now + ttl))
            continue
        if expires_at(holder) < now:
            if store.replace_if_match(key, lease_body(owner, ttl, now, token), etag):
                return won(LeaseResult(True, holder, now - start, took_over=True, token=token, expires=now + ttl))
            continue  # somebody else changed it first: look again
        if done is not None and done():
            return LeaseResult(False, holder, clock() - start, done=True)
        remaining = wait - (clock() - start)
        if remaining <= 0:
            return LeaseResult(False, holder, clock() - start)
        sleep(min(poll, remaining))
    raise StoreError(f"store {store.url}: the lease {key} kept changing under us ({MAX_ATTEMPTS} attempts)")


def expires_at(holder: dict[str, Any]) -> float:
    try:
        return float(holder.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


def ours(holder: dict[str, Any], owner: str, token: Optional[str]) -> bool:
    """Whether the lease ``holder`` is the one ``owner`` took (with ``token``, when given)."""
    return holder.get("owner") == owner and (not token or holder.get("token") == token)


def renew(store: Store, key: str, owner: str, token: str, ttl: float,
          clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Push the expiry of our lease to now + ``ttl`` (compare-and-swap on what we read).

    Returns {"renewed": True, "expires": ...}, or {"renewed": False, "holder": ...} when the lease is
    no longer ours (it lapsed and another host took it, or it was released): the caller lost it."""
    if not store.supports_lock:
        raise StoreError(f"store {store.url} cannot hold a lock (read-only)")
    for _attempt in range(5):
        current = store.read_small(key)
        if current is None:
            return {"renewed": False, "holder": None}
        data, etag = current
        holder = parse_lease(data)
        if not ours(holder, owner, token):
            return {"renewed": False, "holder": holder}
        now = clock()
        acquired = holder.get("acquired")
        if store.replace_if_match(key, lease_body(owner, ttl, now, token, acquired if isinstance(acquired, int) else None),
                                  etag):
            return {"renewed": True, "expires": int(now + ttl)}
    raise StoreError(f"store {store.url}: the lease {key} kept changing while renewing it")


def release(store: Store, key: str, owner: str, token: Optional[str] = None) -> dict[str, Any]:
    """Delete the lease if it is ours (``owner``, and ``token`` when given) and unchanged since we read
    it. Returns {"released": bool, "holder": ...}."""
    if not store.supports_lock:
        raise StoreError(f"store {store.url} cannot hold a lock (read-only)")
    for _attempt in range(5):
        current = store.read_small(key)
        if current is None:
            return {"released": False, "holder": None}
        data, etag = current
        holder = parse_lease(data)
        if not ours(holder, owner, token):
            return {"released": False, "holder": holder}
        if store.delete_if_match(key, etag):
            return {"released": True, "holder": holder}
    raise StoreError(f"store {store.url}: the lease {key} kept changing while releasing it")


def inspect(store: Store, key: str, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Read the lease without changing it (check mode)."""
    current = store.read_small(key)
    if current is None:
        return {"held": False, "holder": None}
    holder = parse_lease(current[0])
    return {"held": expires_at(holder) >= clock(), "holder": holder}

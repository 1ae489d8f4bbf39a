# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keeping the fleet lock while a long step runs.

The role starts each long step of a compile (developer container fetch, build, push) as an Ansible
async task (``poll: 0``) and then runs ``kmod_archive state=held``, which renews the lease every
third of its TTL for as long as that async job runs, and returns when the job ends. Nothing runs
in the background of it: when the holder dies (SIGKILL of the run, the host reboots), the renewing
stops with it and the lease lapses within one TTL; when the job dies without a result, the hold
ends and says so.

Ansible's ``async_wrapper`` (ansible-core ``lib/ansible/modules/async_wrapper.py``) is what is
watched: it answers the task with ``ansible_job_id`` (``<jid>.<pid>``) and ``results_file``, writes
``{"started": true, "finished": false, ...}`` there when the module starts, and replaces it (write
then rename) with the module's result when it ends (a result has no ``started`` key). Its daemonized
watchdog and the module's wrapper keep ``async_wrapper.py <jid> ...`` as their command line for as
long as the job runs."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Optional

from ansible_collections.modulus.kmods.plugins.module_utils import lease as ls
from ansible_collections.modulus.kmods.plugins.module_utils.stores import Store, StoreError

JOB_ID_RE = re.compile(r"(j[0-9]+)\.[0-9]+")
RUNNING, FINISHED, GONE = "running", "finished", "gone"
# A job file that is still missing this long after the hold began, with no process of the job, is gone.
START_GRACE = 10.0


class HoldError(Exception):
    """Bad input for holding; the message names the option."""


def check_lock_options(ttl: float, wait: float, poll: float) -> None:
    """``lock_ttl``, ``lock_wait`` and ``lock_poll`` together: a waiter outlasts a dead holder's lease."""
    if ttl <= 0:
        raise HoldError(f"lock_ttl={ttl} must be positive (seconds)")
    if wait < 0:
        raise HoldError(f"lock_wait={wait} must not be negative")
    if poll <= 0:
        raise HoldError(f"lock_poll={poll} must be positive")
    if 0 < wait <= ttl:
        raise HoldError(f"lock_wait={wait} must be longer than lock_ttl={ttl} (or 0, not to wait): a holder that died"
                        " keeps its lease for up to lock_ttl seconds, and a waiter must outlast it to take over")


def job_id_of(results_file: str) -> str:
    """The job ID (``j<digits>``) async_wrapper names its processes with, from its results file's name."""
    m = JOB_ID_RE.fullmatch(os.path.basename(results_file))
    if not m:
        raise HoldError(f"job={results_file!r} is not the results_file of an async task (.../<ansible_job_id>,"
                        " e.g. ~/.ansible_async/j123456789.4242)")
    return m.group(1)


def job_state(results_file: str) -> Optional[str]:
    """RUNNING or FINISHED from the results file, None when it is not (yet) there or not readable as JSON."""
    try:
        with open(results_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return RUNNING if "started" in data and not data.get("finished") else FINISHED


def job_processes(job_id: str, proc: str = "/proc") -> list[int]:
    """PIDs of the live processes running ``async_wrapper.py <job_id> ...`` (its watchdog and wrapper)."""
    found = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as handle:
                argv = handle.read().split(b"\0")
            with open(os.path.join(proc, name, "stat"), "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
        if state in (b"Z", b"X"):
            continue
        for i, arg in enumerate(argv[:-1]):
            if os.path.basename(arg).startswith(b"async_wrapper") and argv[i + 1].decode(errors="replace") == job_id:
                found.append(int(name))
                break
    return found


def watch_job(results_file: str, proc: str = "/proc") -> Callable[[], str]:
    """A function telling whether the job is RUNNING, FINISHED or GONE (no result, no process)."""
    job_id = job_id_of(results_file)
    begun = time.monotonic()

    def look() -> str:
        state = job_state(results_file)
        if state == FINISHED:
            return FINISHED
        if job_processes(job_id, proc):
            return RUNNING
        # the result may have been written between the two looks
        if job_state(results_file) == FINISHED:
            return FINISHED
        if state is None and time.monotonic() - begun < START_GRACE:
            return RUNNING  # not started yet (async_wrapper forks, then writes the file)
        return GONE

    return look


def parent_watch() -> Callable[[], bool]:
    """A function telling whether the process that started this one is still there (not reparented)."""
    parent = os.getppid()
    return lambda: os.getppid() == parent


def hold(store: Store, key: str, owner: str, token: str, ttl: float, job: Callable[[], str],
         parent_alive: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.time,
         sleep: Callable[[float], None] = time.sleep, look_every: float = 1.0) -> dict[str, Any]:
    """Renew the lease ``key`` every ``ttl / 3`` seconds while ``job()`` says RUNNING and our parent lives.

    Returns {"job": FINISHED|GONE|"orphaned", "lost": bool, "holder": ..., "renewals": n, "errors": [...]}.
    A store error is retried at the next renewal (the lease may lapse meanwhile: then ``lost``); the
    hold never outlives the job nor the run that started it."""
    interval = max(ttl / 3.0, 0.05)
    renewals, errors = 0, []
    lost, holder = False, None
    due = clock()
    while True:
        state = job()
        if state != RUNNING:
            return {"job": state, "lost": lost, "holder": holder, "renewals": renewals, "errors": errors[-5:]}
        if not parent_alive():
            return {"job": "orphaned", "lost": lost, "holder": holder, "renewals": renewals, "errors": errors[-5:]}
        now = clock()
        if not lost and now >= due:
            try:
                res = ls.renew(store, key, owner, token, ttl, clock)
            except StoreError as exc:
                errors.append(str(exc))
                due = now + min(look_every * 5, interval)
            else:
                if res["renewed"]:
                    renewals += 1
                    due = now + interval
                else:
                    lost, holder = True, res.get("holder")
        sleep(min(look_every, max(due - clock(), 0.05)) if not lost else look_every)

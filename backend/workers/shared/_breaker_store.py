"""A circuit breaker's state in Redis, shared by every process that uses the same key.

Each breaker owns two keys: a hash ``<key>`` (``state``, ``failures``, ``opened_at`` in
milliseconds of Redis' own clock, ``open_ms`` the current open period: the first one, 1.5
times longer after each failed probe, capped at the recovery timeout) and ``<key>:probe``,
the half-open probe lease (a token with an expiry, so a prober that dies frees the breaker
when the lease runs out). Every transition is one Lua script, so concurrent processes cannot
both count the same failure, both open the breaker or both take the probe. Redis' ``TIME``
is the only clock used, so hosts with skewed clocks agree.

It implements :class:`_breaker_state.BreakerState`; :mod:`_breaker` imports it only when a
breaker is given a ``redis_url``, and ``redis`` is imported here and nowhere else in the retry
code.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import _runtime
from ._breaker_state import CircuitState, StoreUnavailable, Verdict

# Connection timeouts: a breaker must answer fast even when Redis has gone away.
CONNECT_TIMEOUT = 0.25
SOCKET_TIMEOUT = 0.5

# KEYS[1] state hash, KEYS[2] probe lease.
# ARGV[1] recovery timeout (ms, the open period of a hash without open_ms), ARGV[2] probe
# lease (ms), ARGV[3] token, ARGV[4] key TTL (ms).
# Returns {state, decision ('call'|'probe'|'reject'), retry_after_ms, failures}.
_ACQUIRE = """
local fields = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at', 'open_ms')
local state = fields[1] or 'closed'
local failures = tonumber(fields[2]) or 0
if state == 'closed' then
  return {'closed', 'call', 0, failures}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if state == 'open' then
  local wait = (tonumber(fields[3]) or 0) + (tonumber(fields[4]) or tonumber(ARGV[1])) - now
  if wait > 0 then
    return {'open', 'reject', wait, failures}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open')
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  state = 'half_open'
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then
  return {'half_open', 'probe', 0, failures}
end
local left = redis.call('PTTL', KEYS[2])
if left < 0 then left = 0 end
return {'half_open', 'reject', left, failures}
"""

# KEYS[1] state hash, KEYS[2] probe lease.
# ARGV[1] outcome ('success'|'failure'|'release'), ARGV[2] the call's token,
# ARGV[3] failure threshold, ARGV[4] key TTL (ms), ARGV[5] first open period (ms),
# ARGV[6] recovery timeout (ms, the longest open period).  Returns the state after the outcome.
_RECORD = """
local function open_breaker(period)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'failures', 0, 'open_ms', period)
  return 'open'
end
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local outcome = ARGV[1]
if state == 'half_open' then
  -- only the probe holding the lease decides; earlier calls and a probe whose lease ran
  -- out (another may hold it now) say nothing
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then
    return state
  end
  redis.call('DEL', KEYS[2])
  if outcome == 'success' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
    redis.call('HDEL', KEYS[1], 'opened_at', 'open_ms')
    state = 'closed'
  elseif outcome == 'failure' then
    local last = tonumber(redis.call('HGET', KEYS[1], 'open_ms')) or tonumber(ARGV[5])
    state = open_breaker(math.min(math.floor(last * 1.5), tonumber(ARGV[6])))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return state
end
if state == 'open' or outcome == 'release' then
  return state
end
if outcome == 'success' then
  if redis.call('HEXISTS', KEYS[1], 'failures') == 1 then
    redis.call('HSET', KEYS[1], 'failures', 0)
  end
  return 'closed'
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[3]) then
  state = open_breaker(tonumber(ARGV[5]))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return state
"""

# KEYS[1] state hash; ARGV[1] recovery timeout (ms, as in _ACQUIRE). Read-only: the state
# a caller would meet now (an open breaker past its open period reads as half_open).
_SNAPSHOT = """
local fields = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'open_ms')
local state = fields[1] or 'closed'
if state == 'open' then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  if now - (tonumber(fields[2]) or 0) >= (tonumber(fields[3]) or tonumber(ARGV[1])) then
    return 'half_open'
  end
end
return state
"""


class _Clients:
    """One Redis client (one connection pool) per URL in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_url: dict[str, redis.Redis] = {}

    def after_fork(self) -> None:
        """A fresh lock in a forked child (the parent's may have been held during the fork);
        redis-py itself replaces inherited connections when it sees the new process id."""
        self.lock = threading.Lock()


_CLIENTS = _runtime.part("breaker redis clients", _Clients, _Clients.after_fork)


def _client(url: str) -> redis.Redis:
    """One client (one connection pool) per URL per process; redis-py resets it after fork."""
    clients = _CLIENTS.get()
    with clients.lock:
        client = clients.by_url.get(url)
        if client is None:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                retry=Retry(NoBackoff(), 0),  # the breaker itself decides what to do
            )
            clients.by_url[url] = client
        return client


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBreakerStore:
    """The shared state of one breaker, a :class:`_breaker_state.BreakerState`; every method
    may raise :class:`StoreUnavailable`."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        failure_threshold: int,
        recovery_timeout: float,
        initial_recovery_timeout: float,
        probe_timeout: float,
    ) -> None:
        self.key = key
        self.probe_key = key + ":probe"
        self._keys = [self.key, self.probe_key]
        self._threshold = failure_threshold
        self._recovery_ms = max(1, round(recovery_timeout * 1000))
        self._initial_ms = min(self._recovery_ms, max(1, round(initial_recovery_timeout * 1000)))
        self._lease_ms = max(1, round(probe_timeout * 1000))
        # Keep an idle breaker's keys a good while, never less than an open period.
        self._ttl_ms = max(3_600_000, 10 * self._recovery_ms, 10 * self._lease_ms)
        try:
            client = _client(url)
        except (redis.RedisError, ValueError) as exc:
            raise ValueError(f"redis_url is not a usable Redis URL: {exc}") from None
        self._acquire = client.register_script(_ACQUIRE)
        self._record = client.register_script(_RECORD)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._client = client

    def admit(self) -> Verdict:
        """Ask to call; a probe decision holds the lease under the returned token."""
        token = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex}"  # who holds a lease
        try:
            reply = self._acquire(
                keys=self._keys,
                args=[self._recovery_ms, self._lease_ms, token, self._ttl_ms],
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        state, decision, retry_after_ms, failures = reply
        return Verdict(
            state=CircuitState(_text(state)),
            decision=_text(decision),
            retry_after=int(retry_after_ms) / 1000.0,
            failures=int(failures),
            token=token,
            shared=True,
        )

    def record(self, verdict: Verdict, outcome: str) -> CircuitState:
        """Report the outcome ('success', 'failure' or 'release') of a call admitted with
        ``verdict``; the new state."""
        try:
            reply = self._record(
                keys=self._keys,
                args=[
                    outcome,
                    verdict.token,
                    self._threshold,
                    self._ttl_ms,
                    self._initial_ms,
                    self._recovery_ms,
                ],
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return CircuitState(_text(reply))

    def snapshot(self) -> CircuitState:
        """The state a call would meet now, without changing anything."""
        try:
            reply = self._snapshot(keys=[self.key], args=[self._recovery_ms])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return CircuitState(_text(reply))

    def reset(self) -> None:
        """Forget the shared state (the breaker reads as closed)."""
        try:
            self._client.delete(*self._keys)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

"""Prefix-aware routing for luffy's Ray Serve replicas: a request goes where its prompt's KV already is, unless
that replica is busier than another by more than ``imbalance`` requests.

Ray Serve calls ``choose_replicas`` for each request (in the process that holds the deployment handle: the
ingress) and tries the ranks it returns in order; within a rank it takes the replica with the fewest requests
in flight that still has room (``max_ongoing_requests``, set to the replica's KV slots). The ingress passes
each request's prompt as the chained keys of its full 16-token blocks (serving/prefix_cache.py's
``block_keys``, the keys the replicas' own prefix caches use), and this router remembers the keys it sent to
each replica (an LRU per replica), as Ray's ``PrefixCacheAffinityRouter`` keeps a tree of the text it
routed. For each request:

  1. load = requests in flight per replica (Ray's queue-length cache, probed when stale);
  2. the replicas within ``imbalance`` of the least loaded are eligible;
  3. among them, the one holding the longest run of the prompt's leading blocks wins, ties to the less loaded,
     then to the one that was sent fewer blocks (so new prefixes spread), then at random; the others follow,
     least loaded first.

So a shared system prompt stays on the replica that has it while that replica keeps up, and spills to an idle
one once it is ``imbalance`` requests ahead; the replica it spills to then holds the prefix too, and the two
share it from there. What a replica really holds can differ (its block store evicts, a slot is overwritten):
a wrong guess costs a prefill, never a wrong answer.
"""

from __future__ import annotations

import collections
import random

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica


def prompt_keys(pending_request: PendingRequest | None) -> list[int]:
    """The block keys the ingress attached to the request (its first argument's ``prefix``), or []."""
    if pending_request is None or not pending_request.args:
        return []
    return list(getattr(pending_request.args[0], "prefix", None) or [])


class PrefixAwareRouter(RequestRouter):
    """Longest cached prefix among the replicas not more than ``imbalance`` requests busier than the least busy."""

    def initialize_state(self, imbalance: int = 2, blocks_per_replica: int = 1 << 16):
        self.imbalance, self.blocks_per_replica = imbalance, blocks_per_replica
        self.held: dict[ReplicaID, collections.OrderedDict] = {}

    def matched(self, replica_id: ReplicaID, keys: list[int]) -> int:
        """How many of the prompt's leading blocks this router has sent to ``replica_id``."""
        held = self.held.get(replica_id, {})
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        loads = await self._loads(candidate_replicas)
        known = [r for r in candidate_replicas if loads[r.replica_id] is not None]
        if not known:  # no replica answered: let Ray probe and back off as it does by default
            return [list(candidate_replicas)]
        lightest = min(loads[r.replica_id] for r in known)
        keys = prompt_keys(pending_request)

        def rank(r: RunningReplica):
            load = loads[r.replica_id]
            eligible = load - lightest <= self.imbalance and load < r.max_ongoing_requests
            held = len(self.held.get(r.replica_id, ()))  # a new prefix goes where fewer are kept (Ray's "smallest tenant")
            return (not eligible, -self.matched(r.replica_id, keys) if eligible else 0, load, held, random.random())

        ordered = sorted(known, key=rank)
        return [[r] for r in ordered]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        loads = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in replicas}
        stale = [r for r in replicas if loads[r.replica_id] is None]
        if stale:
            for r, load in await self._probe_queue_lens(stale, 0):
                loads[r.replica_id] = load
        return loads

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult):
        keys = prompt_keys(pending_request)
        if not keys:
            return
        held = self.held.setdefault(replica_id, collections.OrderedDict())
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.blocks_per_replica:
            held.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.held.pop(replica_id, None)

    def update_replicas(self, replicas: list[RunningReplica]):
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for gone in [rid for rid in self.held if rid not in live]:
            del self.held[gone]

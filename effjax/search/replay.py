"""What a journal already holds, indexed by event identity, for the search controller's replay.

Resume in ``effjax.search.evolution`` is re-execution: the controller makes every decision again from the start,
but takes each candidate, band result and hurdle decision from here when the journal has it, and writes an event
only when its identity (``("band", id, band)``, ``("hurdle", id, k)``...) is not in ``written``.
"""


class Recorded:
    """What an existing journal already holds, by event identity."""

    def __init__(self, events: list[dict]):
        self.created, self.results, self.hurdles, self.written = {}, {}, {}, set()
        for e in events:
            kind, n = e.get("event"), e.get("id")
            if kind == "created":
                self.created[n] = e
                self.written.add(("created", n))
            elif kind == "band":
                value = {"objectives": e["objectives"], "cost": e.get("cost", {})}
                self.results[(n, e["band"])] = {"ok": True, "value": value, "wall": e.get("wall", 0.0)}
                self.written.add(("band", n, e["band"]))
            elif kind == "failed":
                self.results[(n, e["band"])] = {"ok": False, "reason": e["reason"], "wall": e.get("wall", 0.0)}
                self.written.add(("failed", n))
            elif kind == "hurdle":
                self.hurdles[(n, e["k"])] = e["passed"]
                self.written.add(("hurdle", n, e["k"]))
            elif kind == "finished":
                self.written.add(("finished", n))

"""Architecture search: programs (Primer-style), NAS over the attention zoo, and the evolution engine."""

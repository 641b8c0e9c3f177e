"""Evidence from the live deployment (SPEC §11): `phiproxy access-review` and `phiproxy
report`. trail.py reads and verifies the audit trail; usage.py aggregates it per identity
and role; tighten.py derives and confirms a tightened rule per role; evidence.py assembles
the report's content; html.py renders it; cli.py holds the two commands."""

"""What the daemon remembers: dedup keys, timer fire times, job history, dynamic schedules.

Each store is SQLite in the state dir (one daemon) or Redis (a fleet sharing one queue);
``stores`` holds the plumbing both kinds share.
"""

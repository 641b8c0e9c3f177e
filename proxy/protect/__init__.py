"""Data protection at the proxy (SPEC §9): values of protected keys encrypted on the way to
Redis and decrypted on the way back, and TTL limits on protected keys."""
